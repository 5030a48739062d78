"""Stand-in for pypa's get-pip.py that ansible-test runs to put pip into its virtualenvs.

ansible-test creates each --venv environment without pip and then runs
~/.ansible/test/cache/get_pip_<version>.py, downloading it from ci-files.testing.ansible.com
when it is not cached. That host is unreachable from air-gapped or proxied machines (such as
this project's CI), while PyPI (or a local index from pip's configuration) is reachable.
tools/ansible-test.sh therefore caches this file under that name: it installs the pip bundled
with the interpreter (ensurepip, no network) and then lets that pip install exactly the
packages ansible-test asked for (``pip==<version>``) from the configured index.

It accepts get-pip.py's command line: pip install arguments plus --no-setuptools/--no-wheel.
"""

import subprocess
import sys

GET_PIP_ONLY_FLAGS = {"--no-setuptools", "--no-wheel"}


def main() -> int:
    pip_args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY_FLAGS]
    # ensurepip in-process sets PIP_CONFIG_FILE=/dev/null in os.environ, which would hide the
    # machine's pip configuration (CA bundle, index) from the install below: run it apart.
    bootstrapped = subprocess.call([sys.executable, "-m", "ensurepip", "--upgrade"])
    if bootstrapped != 0:
        return bootstrapped
    return subprocess.call([sys.executable, "-m", "pip", "install", "--upgrade", *pip_args])


if __name__ == "__main__":
    sys.exit(main())
