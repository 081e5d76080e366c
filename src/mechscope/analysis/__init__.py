"""Reading mechanisms: logit attribution, logit lens, head detectors, weight-space analysis, MLP linearisation."""
