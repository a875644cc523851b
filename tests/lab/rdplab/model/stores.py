"""Certificate stores under LocalMachine (My, Remote Desktop, Root, ...), in insertion order as certlm shows them."""

from __future__ import annotations

from dataclasses import dataclass, field

from rdplab.model.certs import Certificate

DEFAULT_STORES = ("My", "Remote Desktop", "Root")
RDP_STORE = "Remote Desktop"


@dataclass
class CertStores:
    stores: dict[str, list[Certificate]] = field(default_factory=lambda: {name: [] for name in DEFAULT_STORES})

    def _name(self, store: str) -> str | None:
        # Store names are case-insensitive on Windows.
        return next((name for name in self.stores if name.casefold() == store.casefold()), None)

    def exists(self, store: str) -> bool:
        return self._name(store) is not None

    def entries(self, store: str) -> list[Certificate]:
        name = self._name(store)
        return list(self.stores[name]) if name else []

    def find(self, store: str, thumbprint: str) -> Certificate | None:
        wanted = thumbprint.upper()
        return next((cert for cert in self.entries(store) if cert.thumbprint == wanted), None)

    def add(self, store: str, certificate: Certificate) -> Certificate:
        """Add, or merge with the same certificate already there (keeping an existing key link), as Import does."""
        name = self._name(store) or store
        entries = self.stores.setdefault(name, [])
        for index, existing in enumerate(entries):
            if existing.thumbprint == certificate.thumbprint:
                if existing.key_link is None and certificate.key_link is not None:
                    entries[index] = certificate
                return entries[index]
        entries.append(certificate)
        return certificate

    def remove(self, store: str, thumbprint: str) -> bool:
        name = self._name(store)
        if name is None:
            return False
        before = len(self.stores[name])
        self.stores[name] = [cert for cert in self.stores[name] if cert.thumbprint != thumbprint.upper()]
        return len(self.stores[name]) != before

    def all(self) -> list[tuple[str, Certificate]]:
        return [(name, cert) for name, entries in self.stores.items() for cert in entries]
