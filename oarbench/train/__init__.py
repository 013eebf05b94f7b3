"""Training: nnU-Net v2 drivers, federated averaging and the secure storage exchange.

* :mod:`oarbench.train.nnunet`: plan, preprocess, train and predict with nnU-Net v2,
  with explicit paths per call (each nnU-Net step runs in a child process with
  its own environment);
* :mod:`oarbench.train.trainer`: the shipped ``nnUNetTrainer`` subclass (imports
  torch and nnU-Net; used inside the child processes);
* :mod:`oarbench.train.federated`: FedAvg, the coordinator/site round protocol,
  merged fingerprints and shared plans, ``simulate``;
* :mod:`oarbench.train.exchange`: encrypted, signed, atomic objects in fsspec storage;
* :mod:`oarbench.train.keys`: per-party key pairs and the coordinator-signed roster;
* :mod:`oarbench.train.audit`: each party's hash-chained audit log.

Importing this package imports neither torch nor nnU-Net. See docs/training.md.
"""

__all__: list[str] = []
