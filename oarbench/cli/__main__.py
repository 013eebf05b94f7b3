from oarbench.cli import main

main()
