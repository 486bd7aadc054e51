from kernelprop.cli import main

main()
