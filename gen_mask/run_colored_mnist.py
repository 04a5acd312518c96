"""python -m gen_mask.run_colored_mnist: Colored MNIST, any combiner of the registry."""
from and_mask.core.cli import main
from and_mask.experiments import colored_mnist
from gen_mask.gen_mask_utils import METHOD_FLAGS

if __name__ == "__main__":
    main(colored_mnist, METHOD_FLAGS, "gen_mask")
