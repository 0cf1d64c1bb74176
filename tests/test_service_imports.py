"""The service runs without PyTorch: importing and building the app never loads torch."""

import subprocess
import sys


def test_service_never_imports_torch():
    """Importing every service module and creating the app leaves torch out of sys.modules."""
    code = (
        "import sys, pkgutil, importlib, service\n"
        "for m in pkgutil.walk_packages(service.__path__, 'service.'):\n"
        "    importlib.import_module(m.name)\n"
        "from service.api.app import create_app\n"
        "create_app()\n"
        "bad = sorted(n for n in sys.modules if n == 'torch' or n.startswith(('torch.', 'torchvision')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
