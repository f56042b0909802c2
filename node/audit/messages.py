"""DICOM audit messages (PS3.15 Annex A.5, the DICOM audit message schema) as XML.

One builder per event the node reports; each returns the ``AuditMessage`` element.
Codes are written in the schema's form (``csd-code``, ``codeSystemName``,
``originalText``). Patient data appears only here, in the messages meant for the
audit record repository, never in the node's log.
"""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

#: EventOutcomeIndicator values (PS3.15 A.5.3).
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE = "0", "4", "8"

# (code, scheme, meaning) of what the builders use; DCM codes from PS3.16.
APPLICATION_ACTIVITY = ("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = ("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = ("110104", "DCM", "DICOM Instances Transferred")
EXPORT = ("110106", "DCM", "Export")
QUERY = ("110112", "DCM", "Query")
SECURITY_ALERT = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = ("110114", "DCM", "User Authentication")
APPLICATION_START = ("110120", "DCM", "Application Start")
APPLICATION_STOP = ("110121", "DCM", "Application Stop")
LOGIN = ("110122", "DCM", "Login")
LOGOUT = ("110123", "DCM", "Logout")
NODE_AUTHENTICATION = ("110126", "DCM", "Node Authentication")
RESTRICTED_FUNCTION = ("110132", "DCM", "Use of Restricted Function")
USER_SECURITY_CHANGED = ("110137", "DCM", "User Security Attributes Changed")
ROLE_APPLICATION = ("110150", "DCM", "Application")
ROLE_DESTINATION = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = ("110153", "DCM", "Source Role ID")
ROLE_DESTINATION_MEDIA = ("110154", "DCM", "Destination Media")
STUDY_UID = ("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID = ("110181", "DCM", "SOP Class UID")
PATIENT_NUMBER = ("2", "RFC-3881", "Patient Number")
URI = ("12", "RFC-3881", "URI")
#: The query a web search is: a study-level search (Study Root Query/Retrieve - FIND).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


@dataclass(frozen=True)
class Source:
    """Who reports: AuditSourceID, the site, and the node's own participant."""

    source_id: str
    site_id: str
    ae_title: str
    host: str
    process: str  # "pacsnode serve (pid 123)" for the AlternativeUserID's readers


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a user, a DICOM peer or a process."""

    user_id: str
    requestor: bool
    address: str = ""
    role: tuple[str, str, str] | None = None
    alternative_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class StudyObject:
    """A study the event touched, with its patient and the SOP classes involved."""

    study_uid: str
    patient_id: str = ""
    patient_name: str = ""
    accession: str = ""
    sop_classes: dict[str, int] = field(default_factory=dict)  # UID -> instances


def _code(parent: ET.Element, tag: str, code: tuple[str, str, str]) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1],
                                       "originalText": code[2]})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _message(event: tuple[str, str, str], action: str, outcome: str,
             type_code: tuple[str, str, str] | None = None,
             outcome_text: str = "") -> ET.Element:
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action, "EventDateTime": _now(), "EventOutcomeIndicator": outcome})
    _code(ident, "EventID", event)
    if type_code is not None:
        _code(ident, "EventTypeCode", type_code)
    if outcome_text:
        ET.SubElement(ident, "EventOutcomeDescription").text = outcome_text
    return root


def _participant(root: ET.Element, who: Participant) -> None:
    attrs = {"UserID": who.user_id or "unknown",
             "UserIsRequestor": "true" if who.requestor else "false"}
    if who.alternative_id:
        attrs["AlternativeUserID"] = who.alternative_id
    if who.user_name:
        attrs["UserName"] = who.user_name
    if who.address:
        attrs["NetworkAccessPointID"] = who.address
        # 2: an IP address; 1: a machine name.
        attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(who.address) else "1"
    element = ET.SubElement(root, "ActiveParticipant", attrs)
    if who.role is not None:
        _code(element, "RoleIDCode", who.role)


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def node_participant(source: Source, requestor: bool = False,
                     role: tuple[str, str, str] | None = None) -> Participant:
    return Participant(user_id=source.ae_title, requestor=requestor, address=source.host,
                       role=role, alternative_id=f"AETITLES={source.ae_title}",
                       user_name=source.process)


def _finish(root: ET.Element, source: Source, participants: Iterable[Participant],
            studies: Iterable[StudyObject] = ()) -> ET.Element:
    # Schema order: EventIdentification, ActiveParticipant+, AuditSourceIdentification,
    # ParticipantObjectIdentification*.
    for who in participants:
        _participant(root, who)
    attrs = {"AuditSourceID": source.source_id}
    if source.site_id:
        attrs["AuditEnterpriseSiteID"] = source.site_id
    audit_source = ET.SubElement(root, "AuditSourceIdentification", attrs)
    # 4: application server process tier in a multi-tier system.
    _code(audit_source, "AuditSourceTypeCode", ("4", "DCM", "Application Server"))
    patients: dict[str, str] = {}
    for study in studies:
        _study(root, study)
        if study.patient_id:
            patients.setdefault(study.patient_id, study.patient_name)
    for patient_id, name in patients.items():
        _patient(root, patient_id, name)
    return root


def _study(root: ET.Element, study: StudyObject) -> None:
    # Type 2 system object, role 3 report.
    element = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": study.study_uid, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _code(element, "ParticipantObjectIDTypeCode", STUDY_UID)
    if not (study.accession or study.sop_classes):
        return
    # The schema's DICOMObjectDescriptionContents: Accession before SOPClass.
    description = ET.SubElement(element, "ParticipantObjectDescription")
    if study.accession:
        ET.SubElement(description, "Accession", {"Number": study.accession})
    for uid, count in sorted(study.sop_classes.items()):
        ET.SubElement(description, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})


def _patient(root: ET.Element, patient_id: str, name: str) -> None:
    # Type 1 person, role 1 patient.
    element = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": patient_id, "ParticipantObjectTypeCode": "1",
        "ParticipantObjectTypeCodeRole": "1"})
    _code(element, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
    if name:
        ET.SubElement(element, "ParticipantObjectName").text = name


def application_activity(source: Source, started: bool, user: str = "") -> ET.Element:
    """Application Start or Stop (A.5.3.1)."""
    root = _message(APPLICATION_ACTIVITY, "E", SUCCESS,
                    APPLICATION_START if started else APPLICATION_STOP)
    who = [node_participant(source, role=ROLE_APPLICATION)]
    if user:
        who.append(Participant(user_id=user, requestor=True,
                               role=("110151", "DCM", "Application Launcher")))
    return _finish(root, source, who)


def instances_transferred(source: Source, studies: list[StudyObject], *, received: bool,
                          peer_ae: str, peer_address: str, outcome: str = SUCCESS,
                          outcome_text: str = "") -> ET.Element:
    """DICOM Instances Transferred (A.5.3.5): received from a peer (action C, create) or
    delivered to one (action R, read: the node keeps its copy)."""
    root = _message(INSTANCES_TRANSFERRED, "C" if received else "R", outcome,
                    outcome_text=outcome_text)
    peer = Participant(user_id=peer_ae, requestor=received, address=peer_address,
                       alternative_id=f"AETITLES={peer_ae}",
                       role=ROLE_SOURCE if received else ROLE_DESTINATION)
    us = node_participant(source, requestor=not received,
                          role=ROLE_DESTINATION if received else ROLE_SOURCE)
    return _finish(root, source, [peer, us], studies)


def user_authentication(source: Source, user: str, client: str, *, login: bool = True,
                        success: bool = True, reason: str = "") -> ET.Element:
    """User Authentication (A.5.3.14): a login (or its failure) or a logout."""
    root = _message(USER_AUTHENTICATION, "E", SUCCESS if success else MINOR_FAILURE,
                    LOGIN if login else LOGOUT, outcome_text=reason)
    return _finish(root, source, [Participant(user_id=user, requestor=True, address=client),
                                  node_participant(source)])


def query(source: Source, user: str, client: str, parameters: dict[str, Any]) -> ET.Element:
    """Query (A.5.3.12): a user's search of the studies, its parameters as the query."""
    root = _message(QUERY, "E", SUCCESS)
    _finish(root, source, [
        Participant(user_id=user, requestor=True, address=client, role=ROLE_SOURCE),
        node_participant(source, role=ROLE_DESTINATION)])
    element = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": STUDY_ROOT_FIND, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "3"})
    _code(element, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
    encoded = json.dumps(parameters, sort_keys=True).encode()
    ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(encoded).decode()
    return root


def instances_accessed(source: Source, user: str, client: str, study: StudyObject,
                       ) -> ET.Element:
    """DICOM Instances Accessed (A.5.3.4, action R): a user looked at a study."""
    root = _message(INSTANCES_ACCESSED, "R", SUCCESS)
    return _finish(root, source, [Participant(user_id=user, requestor=True, address=client),
                                  node_participant(source)], [study])


def export(source: Source, user: str, client: str, study: StudyObject,
           what: str) -> ET.Element:
    """Export (A.5.3.6): a user downloaded a result file of a study."""
    root = _message(EXPORT, "R", SUCCESS)
    return _finish(root, source, [
        Participant(user_id=user, requestor=True, address=client),
        node_participant(source, role=ROLE_SOURCE),
        Participant(user_id=f"download:{what}", requestor=False, address=client,
                    role=ROLE_DESTINATION_MEDIA)], [study])


def security_alert(source: Source, kind: tuple[str, str, str], reason: str, *,
                   offender: str, address: str, resource: str) -> ET.Element:
    """Security Alert (A.5.3.11): a rejected AE, a failed TLS handshake, a locked
    account, a refused action. ``offender`` is who caused it (an AE title, a user)."""
    root = _message(SECURITY_ALERT, "E", MINOR_FAILURE, kind, outcome_text=reason)
    _finish(root, source, [node_participant(source),
                           Participant(user_id=offender or "unknown", requestor=True,
                                       address=address)])
    # Type 2 system object, role 13 security resource: what was attacked.
    element = ET.SubElement(root, "ParticipantObjectIdentification", {
        "ParticipantObjectID": resource, "ParticipantObjectTypeCode": "2",
        "ParticipantObjectTypeCodeRole": "13"})
    _code(element, "ParticipantObjectIDTypeCode", URI)
    ET.SubElement(element, "ParticipantObjectDetail", {
        "type": "Alert Description", "value": base64.b64encode(reason.encode()).decode()})
    return root


def to_bytes(message: ET.Element) -> bytes:
    return ET.tostring(message, encoding="utf-8", xml_declaration=True)
