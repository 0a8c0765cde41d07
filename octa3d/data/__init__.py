"""Data: from a folder of scans to cached network inputs, in the order the pipeline uses them.

Modules:
    sources     discover subjects of a data root (OCTA-500 layout, manifest CSV, vendor exports, 2D class
                folders); extra data; manifest (the CSV), vendor_sources (Duke, RETOUCH, vendor class folders)
    octa500     OCTA-500 layout facts: FOV table, spacing, masks, projections, label tables, ``--input`` paths
    labels      label tables and the class mapping of a task (binary / multi-class)
    splits      subject-level stratified (grouped) splits, k-fold, the leakage guard
    readers     one scan as an array + its geometry (imagefiles, slices, bmp for the formats; vendor and
                vendor_formats: HEYEX .vol/.e2e/XML, Topcon .fda, Duke .mat through eyepy)
    transforms  slab crop, clip/scale, resize (scaling) and the record that maps inputs back to the source (record)
    presets     the 2D-patch and 3D-clip preprocessing recipes
    datasets    DataHandler: persistent preprocessing cache, datasets, loaders, the epoch sampler
    augment     training augmentation
    nifti       the one NIfTI writer (source geometry)
    subject     Subject and Geometry
    synthetic/  the generated OCTA-500-layout eyes with lesion masks (anatomy, lesions, render, writers);
                vendor_files: HEYEX .vol files of known contents (tests, benchmarks)
"""
