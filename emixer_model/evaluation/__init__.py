"""`emixer evaluate`: does a synthetic release carry its labels, and is it useful next to real data.

Runs at a site, on the site's own data, and writes only aggregates (metrics, counts, figures of
synthetic images and of the release's own training history) into the release folder.
"""
