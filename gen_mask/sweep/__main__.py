from gen_mask.sweep.cli import main

if __name__ == "__main__":
    main()
