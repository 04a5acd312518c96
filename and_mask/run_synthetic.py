"""python -m and_mask.run_synthetic: spirals with signatures, AND-mask or geometric mean."""
from and_mask.core import cli
from and_mask.experiments import synthetic
from and_mask.and_mask_utils import METHOD_FLAGS


def build_parser():
    """The argparse parser of this entry point (built when called, so plugins registered before count)."""
    return cli.build_parser(synthetic, METHOD_FLAGS, "and_mask")


def main(argv=None) -> dict:
    """Parse the flags (`argv`, else the command line), train, return the final evaluation.

    The flags are built when called, so a combiner registered before calling is a valid --method.
    """
    return cli.main(synthetic, METHOD_FLAGS, "and_mask", argv)


if __name__ == "__main__":
    main()
