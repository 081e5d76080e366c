"""Localising behaviour: activation patching, path patching, attribution patching (AtP, AtP*)."""
