from hmcl_cli.cli import main

main()
