"""python -m gen_mask.run_cifar: CIFAR-10 random-label memorisation, any combiner of the registry."""
from and_mask.core.cli import EntryPoint
from and_mask.experiments import cifar
from gen_mask.gen_mask_utils import METHOD_FLAGS

ENTRY = EntryPoint(cifar, METHOD_FLAGS, "gen_mask")
build_parser, main = ENTRY.build_parser, ENTRY.main

if __name__ == "__main__":
    main()
