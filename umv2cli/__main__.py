from umv2cli.cli.app import main

main()
