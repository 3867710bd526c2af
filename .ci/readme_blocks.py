"""Run the README's code blocks marked `<!-- ci: ... -->` with bash, from the repository root.

Used by .ci/run after the quickstart has written out/, so that no README command rots.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md").read_text()
blocks = re.findall(r"<!-- ci:[^>]*-->\s*```bash\n(.*?)```", readme, flags=re.S)
if not blocks:
    sys.exit("no README block is marked for CI")
for i, block in enumerate(blocks, 1):
    print(f"--- README block {i} ---\n{block}", flush=True)
    rc = subprocess.run(["bash", "-euo", "pipefail", "-c", block]).returncode
    if rc:
        sys.exit(f"README block {i} failed with exit status {rc}")
print(f"{len(blocks)} README blocks ran", flush=True)
