"""Tuning and diagnosis: tools that drive training from outside the trainer.

  common.py   a config or run turned into what the tools need (config, tokenizer, data, model)
  doctor.py   `xpmodel doctor`: the debugging checklist as one pass/fail report
  lr_find.py  `xpmodel lr-find`: the learning-rate range test
  compare.py  `xpmodel runs` and `xpmodel compare`: tables and curves of run directories
  sweep.py    `xpmodel sweep`: grid and random search, resumable
  sweep_plan.py  its SPECs and the trials they plan
  sweep_state.py its folder and sweep.json, checked whole when read back
  sweep_results.py  its table of trials (live in a terminal) and result files
  study.py    the sweep's trials drawn and pruned by Optuna (`--sampler tpe`)
  plot.py     matplotlib figures written atomically (`xpmodel plot`, compare, lr-find, sweep)
"""
