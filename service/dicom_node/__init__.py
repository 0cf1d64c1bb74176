"""DICOM node: an ingress beside the HTTP API (README "Receive images from a PACS").

C-ECHO and C-STORE SCP for CR/DX radiographs (scp), checks before acknowledging (intake), a durable
spool and job database (spool, jobs), the same pipeline as HTTP and delivery of the results by C-STORE
or STOW-RS with retries, dead-letter and replay (node, destinations). `python -m service.dicom_node`.
"""
