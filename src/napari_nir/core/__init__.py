"""Pure numpy/torch core of napari-nir: no napari, Qt or magicgui imports here."""
