#!/usr/bin/env bash
# The guarantees of RESULTS.md "Reliability", each checked by the tests named beside it (test_all.py, on the CPU).
# Runs those tests once, keeps pytest's report in studies/logs/reliability/pytest.txt (delete it to run them
# again), and prints the table with each test's result from it. A few minutes on 2 cores.
source "$(dirname "$0")/lib.sh"
keep_logs
export ROWS=$(cat <<'TSV'
`torchrun --nproc_per_node=8 train.py --distill hard` runs as typed: without `--model` the student is the distilled default, and on the bundled data the teacher is the shipped convnet	the command on 2 processes (`test_headline_command_distills_with_the_shipped_teacher`)
A killed run resumes exactly: `--resume` gives the weights and log of an uninterrupted run, also from a checkpoint in the middle of an epoch	kill -9 after the first epoch, and just after a mid-epoch checkpoint (`test_kill_then_resume_equals_uninterrupted`, `test_mid_epoch_checkpoint_resumes_exactly`)
Under `torchrun --max-restarts=N ... --resume auto`, a run whose worker dies finishes by itself, with the uninterrupted run's weights	one of 2 workers killed with `--max-restarts=1` (`test_torchrun_restart_finishes_the_run_by_itself`)
One run per out-dir: a second one stops with one line naming the first; a lock left by a killed run blocks nothing; the lock is taken before the data, model or weights load, and forked DataLoader workers do not hold it	two runs on one out-dir, then kill -9 and `--resume auto` (`test_one_out_dir_one_run`); a data load that finds the lock held (`test_the_lock_is_taken_before_anything_slow`); a forked child outliving its run (`test_forked_children_do_not_hold_the_lock`)
kill -9 of the torchrun agent: its workers stop within a second, so the same command runs again	`test_workers_stop_when_the_torchrun_agent_is_killed`
Disk problems are one line: an out-dir under a file or not writable before any training; a full disk, met while writing a checkpoint, the log or a picture, keeps the previous file and leaves no temp file	a real 16 MB tmpfs as the out-dir, in a mount namespace of its own (`test_a_real_full_disk_is_one_line_and_keeps_the_last_checkpoint`), and `test_disk_problems_are_one_line`
A nan/inf loss stops the run and keeps the last good checkpoint	`test_nan_loss_stops_and_keeps_last_good_checkpoint`
Bad flags are one line before anything loads: every number flag of train.py, finetune.py, mae.py and detect.py has its range in its parser's `ranges` (`launch.check_args`), and each finite bound is tried; a missing, empty or folder weights file; an `--img-size` whose step cannot fit in memory; `--resume` with nothing to resume or of a finished run	`test_bad_flag_values_are_one_line_before_anything_loads`, `test_every_number_flag_has_a_range_and_each_range_is_enforced`, `test_files_and_sizes_that_cannot_work`, `test_resume_without_a_run_or_of_a_finished_one`
An image folder with a symlink loop or an image linked twice is one line naming both paths (torchvision's ImageFolder lists them again and again)	`test_image_folder_listing_is_imagefolders_and_refuses_what_it_reaches_twice`
The next steps a run prints work as printed (evaluate, train on, fine-tune an MAE checkpoint)	`test_next_steps_work_as_printed`
Same seed, same run; a 2-process run equals a 1-process run (random draws off)	`test_two_process_ddp_equals_one_process`
TSV
)
if [ ! -f "$LOGS/pytest.txt" ]; then
  tests=$(python -c "import os, re; print(' or '.join(sorted(set(re.findall(r'\`(test_\w+)\`', os.environ['ROWS'])))))")
  ran > "$RUNS/pytest.txt"
  python -m pytest -q -rpfEs test_all.py -k "$tests" >> "$RUNS/pytest.txt" 2>&1 || true  # the table shows failures
  [ "$LOGS" = "$RUNS" ] || cp "$RUNS/pytest.txt" "$LOGS/"
fi
report <<'PY'
import re
log = open(f"{OUT}/pytest.txt").read()
def result(test):  # pytest -rp: "PASSED test_all.py::test_x[...]"
    found = re.findall(rf"^(PASSED|FAILED|ERROR|SKIPPED)\S* test_all\.py::{test}\b", log, re.M)
    return "not run" if not found else found[0].lower() if len(set(found)) == 1 else "/".join(sorted(set(found))).lower()
rows = [line.split("\t") for line in os.environ["ROWS"].splitlines()]
table(["guarantee", "how it is tested", "result"],
      [[g, how, "passed" if all(r == "passed" for r in results) else ", ".join(results)]
       for g, how in rows for results in [[result(t) for t in re.findall(r"`(test_\w+)`", how)]]])
print("\nran " + log.splitlines()[0][len("# ran "):] + "; " + log.strip().splitlines()[-1].strip("= "))
PY
