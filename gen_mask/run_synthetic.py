"""python -m gen_mask.run_synthetic: spirals with signatures, any combiner of the registry."""
from and_mask.core.cli import EntryPoint
from and_mask.experiments import synthetic
from gen_mask.gen_mask_utils import METHOD_FLAGS

ENTRY = EntryPoint(synthetic, METHOD_FLAGS, "gen_mask")
build_parser, main = ENTRY.build_parser, ENTRY.main

if __name__ == "__main__":
    main()
