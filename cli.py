"""`python cli.py fit -c configs/quickstart.yaml`: the same command as the installed `nanolit` (one definition)."""
from nanolit.cli import main

if __name__ == "__main__":
    main()
