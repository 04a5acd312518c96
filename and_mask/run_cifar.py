"""python -m and_mask.run_cifar: CIFAR-10 random-label memorisation, AND-mask or geometric mean."""
from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core.cli import EntryPoint
from and_mask.experiments import cifar

ENTRY = EntryPoint(cifar, METHOD_FLAGS, "and_mask")
build_parser, main = ENTRY.build_parser, ENTRY.main

if __name__ == "__main__":
    main()
