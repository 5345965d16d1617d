"""FineMask napari plugin: dock widget, reader, writer and sample data (manifest: napari.yaml).

Nothing heavy is imported here; napari imports each contribution's module when it is used.
"""
