"""``lumireg pacs``: a DICOM node between a PACS and the lumireg service.

It receives series over DIMSE (C-STORE SCP, :mod:`lumireg.pacs.dimse`) or finds them over DICOMweb (QIDO-RS,
:mod:`lumireg.pacs.dicomweb`), picks the pairs to register by a rule file (:mod:`lumireg.pacs.rules`), registers
them through the service (:class:`lumireg.client.RegistrationClient`), and stores the results back as DICOM
(:mod:`lumireg.client.dicom`). Work is kept in an on-disk journal (:mod:`lumireg.pacs.journal`), so a restarted
node finishes a study once. Logs carry UIDs only, never patient names.
"""
