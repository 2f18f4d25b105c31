"""``python -m dino.train --config-file F --output-dir D [--no-resume] [key=value ...]``."""
from dino.train.train import main

if __name__ == "__main__":
    main()
