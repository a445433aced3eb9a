"""`import export_torch` with `tools/` on the Python path: the PyTorch exporter of the flatmin
Python package (python/flatmin/export_torch.py, also `flatmin.export_torch` once the package is
installed), loaded from its file so that neither the package nor its native extension needs
to be installed. The command line is the same:

    python tools/export_torch.py --module mypkg.models:make_net my_net.json
"""

import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "flatmin",
                     "export_torch.py")
_spec = importlib.util.spec_from_file_location("export_torch", _PATH)
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)

if __name__ == "__main__":
    sys.exit(_module.main())
