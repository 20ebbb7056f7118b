"""`emixer evaluate`: does a synthetic release carry its labels, and is it useful next to real data.

Runs at a site, on the patients the site held out before round 1 (emixer_model/data/splits.py),
and writes only aggregates (metrics, counts, figures of synthetic images and of the release's own
privacy history) into a folder of the site's own, never into the release.
"""
