"""Train a DiT: `torchrun --nproc_per_node=N train.py --model DiT-XL/2 ...`, or `python train.py ...` on one device."""

from dit_fast.train import main

if __name__ == "__main__":
    main()
