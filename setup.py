"""gmailproxy: a mail proxy on gevent configured and behaving like nginx's mail module."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements() -> tuple[list[str], list[str]]:
    """requirements.txt: runtime lines, then test lines after the '# Tests' comment."""
    runtime, tests, current = [], [], None
    for line in (HERE / 'requirements.txt').read_text().splitlines():
        if line.startswith('#'):
            current = tests if line.lower().startswith('# tests') else runtime
        elif line.strip():
            (current if current is not None else runtime).append(line.strip())
    return runtime, tests


RUNTIME, TESTS = requirements()
VERSION = re.search(r"^VERSION = '([^']+)'", (HERE / 'gmailproxy/cli.py').read_text(),
                    re.M).group(1)

setup(
    name='gmailproxy',
    version=VERSION,
    description=__doc__,
    packages=find_packages(include=['gmailproxy', 'gmailproxy.*']),
    python_requires='>=3.11',
    install_requires=RUNTIME,
    extras_require={'test': TESTS},
    entry_points={'console_scripts': ['gmailproxy = gmailproxy.cli:main']},
)
