"""python -m and_mask.run_colored_mnist: Colored MNIST, AND-mask or geometric mean."""
from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core.cli import main
from and_mask.experiments import colored_mnist

if __name__ == "__main__":
    main(colored_mnist, METHOD_FLAGS, "and_mask")
