"""Learned-rounding passes: block reconstruction (AdaRound, BRECQ, QDrop), AdaQuant, MRECG."""
