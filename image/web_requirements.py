"""Print the web layer's requirements (setup.cfg install_requires), one a line; extras named after
the file (`python image/web_requirements.py setup.cfg rq`) are added.

The Docker image and `make image-env` both install them on top of image/requirements.txt, held
to that environment's versions by a constraints file; reading them here keeps one source."""
import configparser
import sys
from pathlib import Path

config = configparser.ConfigParser()
config.read(Path(sys.argv[1] if len(sys.argv) > 1 else "setup.cfg"))
lines = config["options"]["install_requires"].splitlines()
for extra in sys.argv[2:]:
    lines += config["options.extras_require"][extra].splitlines()
for line in lines:
    line = line.strip()
    if line and not line.startswith("#"):
        print(line)
