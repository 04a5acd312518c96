"""python -m and_mask.run_colored_mnist: Colored MNIST, AND-mask or geometric mean."""
from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core import cli
from and_mask.experiments import colored_mnist


def main(argv=None) -> dict:
    """Parse the flags (`argv`, else the command line), train, return the final evaluation."""
    return cli.main(colored_mnist, METHOD_FLAGS, "and_mask", argv)


if __name__ == "__main__":
    main()
