"""From stored runs to report.json: the reconstruction of a whole protocol.

Reads runs from the catalog only (:func:`nvmri_bluesky.reconstruct.runs.load_run`),
never the simulator: each sample's ``{measurement: uid}`` map says which run
is which.  Figures are written beside the report.

The modules: :mod:`.sample` (a sample's runs -> its partial report, and the
merged report.json), one per kind of run (:mod:`.calibration`, :mod:`.spins`,
:mod:`.layers`, :mod:`.evolution`), :mod:`.text` (the table beside the
paper's values) and :mod:`.run` (``nvmri reconstruct``: one stored run).
"""
