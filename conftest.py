"""Repository-wide pytest setup (it also covers the notebooks that pytest runs through nbmake).

Tests and notebooks run at the quick size unless LORA_NP_QUICK is already set: the full sizes are for runs by
hand. Base models pretrained by tests go to a throwaway cache, never to the user's ~/.cache/lora_np.
"""

import os
import tempfile

os.environ.setdefault("LORA_NP_QUICK", "1")
os.environ.setdefault("LORA_NP_CACHE", os.path.join(tempfile.gettempdir(), "lora_np_test_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
