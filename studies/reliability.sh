#!/usr/bin/env bash
# The guarantees of RESULTS.md "Reliability", each checked by the test named beside it. A few minutes.
source "$(dirname "$0")/lib.sh"
python -m pytest -q -rA test_all.py -k "headline_command or kill_then_resume_equals or mid_epoch_checkpoint or \
torchrun_restart or one_out_dir_one_run or lock_is_taken or forked_children or agent_is_killed or disk_problems or \
real_full_disk or nan_loss_stops or bad_flag_values or every_number_flag or files_and_sizes or \
resume_without_a_run or reaches_twice or two_process_ddp_equals or next_steps_work_as_printed" 2>&1 \
  | grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed"
