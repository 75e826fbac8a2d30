from mkd.cli import main

main()
