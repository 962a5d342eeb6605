from __future__ import annotations

import subprocess
import sys

from monai_unet_bundle.errors import EXIT_CODE, BundleInputError, find_input_error, one_line


def test_find_input_error_walks_cause_and_context():
    inner = BundleInputError("mask a.png is bad.")
    try:
        try:
            raise inner
        except BundleInputError as e:
            raise RuntimeError("Failed to instantiate component") from e
    except RuntimeError as outer:
        assert find_input_error(outer) is inner
    assert find_input_error(RuntimeError("other")) is None
    assert find_input_error(None) is None


def test_one_line_extracts_sentence_from_worker_traceback():
    text = (
        "Caught BundleInputError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmonai_unet_bundle.errors.BundleInputError: mask m.png holds values 7.\n'
    )
    assert one_line(BundleInputError(text)) == "mask m.png holds values 7."
    assert one_line(BundleInputError("plain sentence.")) == "plain sentence."


def test_uncaught_input_error_prints_one_line_and_exits_2():
    code = (
        "from monai_unet_bundle.settings import check_settings\n"
        "check_settings()  # the first step of every workflow installs the hook\n"
        "from monai_unet_bundle.errors import BundleInputError\n"
        "try:\n    raise BundleInputError('setting x is wrong: use y.')\n"
        "except BundleInputError as e:\n    raise RuntimeError('wrapped') from e\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == EXIT_CODE
    assert proc.stderr.strip() == "error: setting x is wrong: use y."


def test_other_errors_keep_their_traceback():
    proc = subprocess.run(
        [sys.executable, "-c", "from monai_unet_bundle.settings import check_settings\ncheck_settings()\nraise KeyError('k')"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError" in proc.stderr


def test_importing_the_package_installs_nothing():
    code = "import sys\nhook = sys.excepthook\nimport monai_unet_bundle, monai_unet_bundle.data\nprint(sys.excepthook is hook)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "True"


def test_several_problems_print_one_error_line_each():
    code = (
        "from monai_unet_bundle.settings import check_settings\n"
        "check_settings(batch_size=0, tta='maybe')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == EXIT_CODE
    assert proc.stderr.splitlines() == [
        "error: batch_size is 0, but it must be auto or a whole number of at least 1: pass --batch_size with such a value.",
        "error: tta is 'maybe', but it must be auto, true or false: pass --tta with such a value.",
    ]


def test_the_error_line_reaches_the_terminal_when_sys_stderr_is_redirected():
    # torch.distributed's exception hook (under torchrun) points sys.stderr at a buffer before ours runs
    code = (
        "import io, sys\n"
        "from monai_unet_bundle.settings import check_settings\n"
        "check_settings()\n"
        "sys.stderr = io.StringIO()\n"
        "from monai_unet_bundle.errors import BundleInputError\n"
        "raise BundleInputError('mask m.png holds values 7: fix the mask.')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == EXIT_CODE and proc.stderr == "error: mask m.png holds values 7: fix the mask.\n"


def test_a_multi_line_library_message_is_not_cut_to_its_last_line():
    from monai_unet_bundle.errors import short_reason

    text = "cannot find a reader for m.png.\n=== reader 1 ===\nTraceback (most recent call last):\n  ...\nValueError: x\n"
    assert one_line(BundleInputError("mask m.png cannot be read (x): replace it.")) == "mask m.png cannot be read (x): replace it."
    assert short_reason(RuntimeError(text)) == "RuntimeError: cannot find a reader for m.png."
