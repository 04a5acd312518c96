"""python -m gen_mask.run_colored_mnist: Colored MNIST, any combiner of the registry."""
from and_mask.core.cli import EntryPoint
from and_mask.experiments import colored_mnist
from gen_mask.gen_mask_utils import METHOD_FLAGS

ENTRY = EntryPoint(colored_mnist, METHOD_FLAGS, "gen_mask")
build_parser, main = ENTRY.build_parser, ENTRY.main

if __name__ == "__main__":
    main()
