from nanolit.cli import main

main()
