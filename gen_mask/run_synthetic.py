"""python -m gen_mask.run_synthetic: spirals with signatures, any combiner of the registry."""
from and_mask.core.cli import main
from and_mask.experiments import synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS

if __name__ == "__main__":
    main(synthetic, METHOD_FLAGS, "gen_mask")
