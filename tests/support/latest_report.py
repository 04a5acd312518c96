"""`make test-latest`: the suite against the newest release of every dependency.

Makes a throw-away virtual environment with the Python that runs this script, installs the project
there from setup.py's loose requirements (so pip takes the newest release that each bound allows),
runs the suite, and ends with one line: the packages whose versions differ from the lock
(requirements.txt, for this Python and platform) and the tests that fail with them. Exits non-zero
when a test fails, so that a maintainer sees early which release will break the next `make lock`.
"""
import json
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.txt"
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def locked_versions(lock_text):
    """{canonical name: version} of the lock's pins whose markers hold for this interpreter."""
    pins = {}
    for line in lock_text.splitlines():
        match = PIN.match(line)
        if match and (match[3] is None or Marker(match[3]).evaluate()):
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def differences(locked, installed):
    """'name locked -> installed' for every locked package installed at another version, sorted."""
    return [f"{name} {locked[name]} -> {installed[name]}" for name in sorted(locked)
            if name in installed and installed[name] != locked[name]]


def failed_tests(junit_xml):
    """The node ids ('file::name') of the failed and erroring test cases of a JUnit XML report."""
    failed = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/")
            failed.append(f"{path}.py::{case.get('name')}" if path else case.get("name"))
    return failed


def report_line(changed, failed):
    """The one closing line of `make test-latest`."""
    packages = (f"{len(changed)} {'package differs' if len(changed) == 1 else 'packages differ'} from the lock"
                f" ({', '.join(changed)})" if changed else "every package is at its locked version")
    tests = (f"{len(failed)} {'test fails' if len(failed) == 1 else 'tests fail'} ({', '.join(failed)})" if failed
             else "no test fails")
    return f"test-latest: {packages}; {tests}"


def main():
    with tempfile.TemporaryDirectory(prefix="test-latest-") as scratch:
        env_dir = Path(scratch) / "env"
        python = env_dir / "bin" / "python"
        subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "--upgrade-strategy", "eager",
                        "-e", f"{ROOT}[test,cluster]"], check=True)
        listing = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True,
                                 capture_output=True, text=True).stdout
        installed = {canonicalize_name(p["name"]): p["version"] for p in json.loads(listing)}
        junit = Path(scratch) / "junit.xml"
        suite = subprocess.run([str(python), "-m", "pytest", "-q", f"--junitxml={junit}"], cwd=ROOT)
        failed = failed_tests(junit) if junit.exists() else [f"the suite itself (pytest exit {suite.returncode})"]
    print(report_line(differences(locked_versions(LOCK.read_text()), installed), failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
