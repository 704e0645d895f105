"""wff.pacs.dicomweb against a real Orthanc with its DICOMweb plugin (tests/orthanc.py): which MR
studies are new, what WADO-RS retrieval returns, and the memory of what was taken."""

from __future__ import annotations

import datetime as dt
import io
import json

import numpy as np
import pydicom
import pytest
from conftest import dicom_slice
from orthanc import orthanc  # noqa: F401  (fixture)
from pydicom.uid import generate_uid
from test_pacs_send import CALLING_AE, mr_datasets, result_objects

from wff.pacs.dicomweb import DicomwebError, DicomwebSource, multipart_parts
from wff.pacs.send import CStoreSender


@pytest.fixture(autouse=True)
def empty(orthanc):
    orthanc.clear()


def upload_study(orthanc, series: int = 2, slices: int = 3, modality: str = "MR",
                 study_date: str | None = None) -> tuple[str, dict[str, bytes]]:
    """A synthetic study uploaded through Orthanc's REST API: (StudyInstanceUID, {SOPInstanceUID: bytes}).
    Without ``study_date`` its instances have no StudyDate."""
    uids = {"study": generate_uid(), **{s + 1: generate_uid() for s in range(series)}}
    files = {}
    for s in range(1, series + 1):
        for i in range(slices):
            data = dicom_slice(np.full((8, 8), 10 * i + s), s, f"SAG {s}", i, 60, uids)
            if modality != "MR" or study_date is not None:
                ds = pydicom.dcmread(io.BytesIO(data))
                if study_date is not None:
                    ds.StudyDate = study_date
                if modality != "MR":
                    ds.Modality, ds.SOPClassUID = modality, pydicom.uid.CTImageStorage
                    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                buffer = io.BytesIO()
                ds.save_as(buffer, enforce_file_format=True)
                data = buffer.getvalue()
            files[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = data
            orthanc.upload(data)
    return uids["study"], files


def sop_uid(data: bytes) -> str:
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID


class TestNewStudiesAndRetrieve:
    def test_retrieve_returns_the_stored_files(self, orthanc):
        """A new MR study is listed once; retrieve returns each MR instance with its stored bytes' data set."""
        study, files = upload_study(orthanc)
        source = DicomwebSource(orthanc.dicomweb)
        assert source.new_studies() == [study]
        got = source.retrieve(study)
        assert sorted(sop_uid(data) for _, data in got) == sorted(files)
        for _, data in got:
            original = pydicom.dcmread(io.BytesIO(files[sop_uid(data)]))
            received = pydicom.dcmread(io.BytesIO(data))
            assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
            assert received.PixelData == original.PixelData
        assert len({name for name, _ in got}) == len(got)
        assert source.new_studies() == []

    def test_other_modalities_are_not_listed(self, orthanc):
        """A CT study is not an MR study."""
        upload_study(orthanc, series=1, modality="CT")
        assert DicomwebSource(orthanc.dicomweb).new_studies() == []

    def test_results_do_not_make_a_study_new(self, orthanc):
        """The gateway's SR and GSPS stored into a taken study: not new, and retrieve skips them."""
        mr = mr_datasets(2)
        for ds in mr:
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            orthanc.upload(buffer.getvalue())
        source = DicomwebSource(orthanc.dicomweb)
        study = mr[0].StudyInstanceUID
        assert source.new_studies() == [study]
        assert len(source.retrieve(study)) == 2
        CStoreSender(orthanc.address, CALLING_AE).send(result_objects(mr))
        assert len(orthanc.get(f"/studies/{orthanc.study_id(study)}/instances")) == 4
        assert source.new_studies() == []
        assert sorted(sop_uid(data) for _, data in source.retrieve(study)) == sorted(ds.SOPInstanceUID for ds in mr)

    def test_late_instance_makes_the_study_new_again(self, orthanc):
        """One more MR instance after the study was taken: listed again, and retrieve returns all of them."""
        study, files = upload_study(orthanc, series=1, slices=2)
        source = DicomwebSource(orthanc.dicomweb)
        source.new_studies()
        source.retrieve(study)
        series_uid = pydicom.dcmread(io.BytesIO(next(iter(files.values())))).SeriesInstanceUID
        late = dicom_slice(np.full((8, 8), 7), 1, "SAG 1", 5, 60, {"study": study, 1: series_uid})
        orthanc.upload(late)
        assert source.new_studies() == [study]
        assert sorted(sop_uid(data) for _, data in source.retrieve(study)) == sorted([*files, sop_uid(late)])


class TestSince:
    @pytest.fixture
    def dated(self, orthanc) -> dict[str, str]:
        """Three MR studies in Orthanc: dated 2024-01-05, 2024-01-15, and one without StudyDate."""
        return {name: upload_study(orthanc, series=1, slices=1, study_date=date)[0]
                for name, date in (("early", "20240105"), ("late", "20240115"), ("undated", None))}

    def test_a_date_takes_the_studies_from_that_day_on(self, orthanc, dated):
        """--since YYYYMMDD: the study dated before is not listed; one dated that very day is; one without StudyDate is
        not (it matches no date range); without --since all three are."""
        assert DicomwebSource(orthanc.dicomweb, since="20240110").new_studies() == [dated["late"]]
        assert DicomwebSource(orthanc.dicomweb, since="20240115").new_studies() == [dated["late"]]
        assert DicomwebSource(orthanc.dicomweb, since="20240116").new_studies() == []
        assert sorted(DicomwebSource(orthanc.dicomweb).new_studies()) == sorted(dated.values())

    def test_days_count_back_from_today_at_each_listing(self, orthanc, dated):
        """--since 7d on 2024-01-20 lists from 2024-01-13 on (the later study only); the same source on 2024-01-23
        lists from 2024-01-16 on: nothing. 0d is today only."""
        today = [dt.date(2024, 1, 20)]
        source = DicomwebSource(orthanc.dicomweb, since="7d", today=lambda: today[0])
        assert source.since_date() == "20240113"
        assert source.new_studies() == [dated["late"]]
        assert len(source.retrieve(dated["late"])) == 1
        today[0] = dt.date(2024, 1, 23)
        assert source.new_studies() == []
        on_the_day = DicomwebSource(orthanc.dicomweb, since="0d", today=lambda: dt.date(2024, 1, 15))
        assert on_the_day.new_studies() == [dated["late"]]


class TestStateFile:
    def test_survives_a_restart(self, orthanc, tmp_path):
        """A second source over the same state file does not list the study again; it lists a study it has not taken."""
        state = tmp_path / "dicomweb.json"
        study, _ = upload_study(orthanc, series=1, slices=1)
        first = DicomwebSource(orthanc.dicomweb, state_file=state)
        first.new_studies()
        first.retrieve(study)
        other, _ = upload_study(orthanc, series=1, slices=1)
        assert DicomwebSource(orthanc.dicomweb, state_file=state).new_studies() == [other]
        assert study not in state.read_text()  # keyed by a hash

    def test_forgets_deleted_studies(self, orthanc, tmp_path):
        """A study deleted on the server leaves the memory at the next listing."""
        state = tmp_path / "dicomweb.json"
        study, _ = upload_study(orthanc, series=1, slices=1)
        source = DicomwebSource(orthanc.dicomweb, state_file=state)
        source.new_studies()
        source.retrieve(study)
        assert len(json.loads(state.read_text())["studies"]) == 1
        orthanc.clear()
        assert source.new_studies() == []
        assert json.loads(state.read_text())["studies"] == {}

    def test_unreadable_state_names_the_file(self, tmp_path):
        """A state file of another format: ValueError naming it and what to do."""
        state = tmp_path / "dicomweb.json"
        state.write_text('{"something": "else"}')
        with pytest.raises(ValueError, match="dicomweb.json: not a DICOMweb watch state.*move it away"):
            DicomwebSource("http://127.0.0.1:1/dicom-web", state_file=state)


class TestErrors:
    def test_not_dicomweb(self, orthanc):
        """A URL that is not a DICOMweb root: DicomwebError with the HTTP status."""
        with pytest.raises(DicomwebError, match="HTTP 404") as info:
            DicomwebSource(f"{orthanc.url}/nothing").new_studies()
        assert info.value.status == 404

    def test_unreachable(self):
        """Nothing listening: DicomwebError naming the server."""
        from test_pacs_send import _closed_port

        url = f"http://127.0.0.1:{_closed_port()}/dicom-web"
        with pytest.raises(DicomwebError, match=f"{url} failed: ConnectionError"):
            DicomwebSource(url, timeout_s=5).new_studies()

    def test_bad_url(self):
        with pytest.raises(ValueError, match="must start with http"):
            DicomwebSource("pacs:8042/dicom-web")


class TestMultipart:
    def test_binary_parts(self):
        """Parts keep CR LF and dashes inside their bodies; the quoted boundary parameter is read."""
        bodies = [b"\r\n--not-it\r\n\x00\xff", b"second"]
        message = b"".join(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + body + b"\r\n" for body in bodies) + b"--b0undary--\r\n"
        assert multipart_parts('multipart/related; type="application/dicom"; boundary="b0undary"', message) == bodies

    def test_no_boundary(self):
        with pytest.raises(ValueError, match="without a boundary"):
            multipart_parts("multipart/related", b"")
