from topotorch.cli import main

main()
