"""`make test-latest`'s report: which pins apply here, what differs, which tests failed, one line."""
import sys

from tests.support.latest_report import differences, failed_tests, locked_versions, report_line

LOCK = f"""# header
numpy==2.4.6 ; python_full_version < '{sys.version_info.major}.{sys.version_info.minor + 1}' \\
    --hash=sha256:00
numpy==2.5.5 ; python_full_version >= '{sys.version_info.major}.{sys.version_info.minor + 1}' \\
    --hash=sha256:11
colorama==0.4.6 ; sys_platform == 'nonexistent-os' \\
    --hash=sha256:22
Torch==2.14.1 \\
    --hash=sha256:33
    # via project
"""


def test_locked_versions_keep_the_pins_whose_markers_hold_here():
    assert locked_versions(LOCK) == {"numpy": "2.4.6", "torch": "2.14.1"}


def test_differences_name_each_changed_package_once():
    locked = {"numpy": "2.4.6", "torch": "2.14.1", "scipy": "1.17.1"}
    installed = {"numpy": "2.5.0", "torch": "2.14.1", "pip": "26.0"}
    assert differences(locked, installed) == ["numpy 2.4.6 -> 2.5.0"]


def test_failed_tests_read_failures_and_errors_of_a_junit_report(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text("""<testsuites><testsuite>
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad[x]"><failure message="boom"/></testcase>
      <testcase classname="tests.test_b" name="test_setup"><error message="fixture"/></testcase>
      <testcase classname="tests.test_b" name="test_skipped"><skipped/></testcase>
    </testsuite></testsuites>""")
    assert failed_tests(report) == ["tests/test_a.py::test_bad[x]", "tests/test_b.py::test_setup"]


def test_report_line_is_one_line_with_both_halves():
    assert report_line([], []) == "test-latest: every package is at its locked version; no test fails"
    line = report_line(["numpy 2.4.6 -> 2.5.0"], ["tests/test_a.py::test_bad"])
    assert line == ("test-latest: 1 package differs from the lock (numpy 2.4.6 -> 2.5.0); "
                    "1 test fails (tests/test_a.py::test_bad)")
    assert report_line(["a 1 -> 2", "b 1 -> 2"], ["t1", "t2"]).endswith("2 tests fail (t1, t2)")
    assert "\n" not in line
