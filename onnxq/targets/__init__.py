"""Target profiles (what each runtime fuses and allows), Q/DQ placement, the rule checker, and the
target exporters."""
