"""python -m and_mask.run_synthetic: spirals with signatures, AND-mask or geometric mean."""
from and_mask.and_mask_utils import METHOD_FLAGS
from and_mask.core.cli import main
from and_mask.experiments import synthetic

if __name__ == "__main__":
    main(synthetic, METHOD_FLAGS, "and_mask")
