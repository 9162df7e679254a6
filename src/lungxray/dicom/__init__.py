"""lungxray beside a PACS: a DICOM Storage SCP that answers each chest film with a Structured Report
sent back to the PACS (`DicomNode`, `lungxray dicom listen`), and a Storage SCU (`send_files`,
`lungxray dicom send`). pynetdicom speaks the network, highdicom writes the reports, pydicom the files.

    received -> spool/incoming (atomically, before the C-STORE success) -> predicted -> report in
    spool/outbox -> C-STORE to the PACS, retried -> spool/sent/<SOP Instance UID> (never sent twice)
"""
