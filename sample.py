"""Sample images from a DiT: `python sample.py --help` (see dit_fast/sample.py)."""

from dit_fast.sample import main

if __name__ == "__main__":
    main()
