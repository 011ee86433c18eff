from pono.cli import main

main()
