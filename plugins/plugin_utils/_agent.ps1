# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# The rdpfix agent: executes one batch of named, primitive operations on a Windows host and prints the result
# document as one line of compressed JSON. The contract (operations, argument and data shapes, error types) is
# docs/agent-protocol.md. The agent makes no decisions: every choice is made by the planners on the controller.
#
# Runs on Windows PowerShell 5.1 and PowerShell 7. This file must stay ASCII: Windows PowerShell 5.1 reads script
# text without a BOM in the ANSI code page.
#
# The controller runs this file the way Ansible runs any PowerShell module (docs/agent-protocol.md, "Transport"): its
# exec wrapper sets $complex_args, whose "batch" is the batch JSON, and takes what this script writes to stdout as the
# module's result. The #Requires line is what marks the file as a PowerShell module to Ansible's wrapper builder.
# Run directly (powershell.exe -File), the batch is the -BatchJson parameter.
#Requires -Version 5.1

param([string]$BatchJson)

$ErrorActionPreference = 'Stop'
# Progress records would reach the controller as CLIXML noise on stderr.
$ProgressPreference = 'SilentlyContinue'

$ProtocolVersion = 1
# How deep the result document is written (ConvertTo-Json -Depth). An operation's data sits three levels down (the
# document, its results list, one result), so it keeps $DataJsonDepth levels: what a guard compares and what the lock
# record holds go through JSON at that depth, exactly as the controller will see them.
$ResultJsonDepth = 10
$DataJsonDepth = $ResultJsonDepth - 3

# Windows PowerShell 5.1 ships an ETS member on System.Array that makes ConvertTo-Json write some arrays as
# {"value": [...], "Count": n}. Removing that type data for this process restores plain JSON arrays.
if ($PSVersionTable.PSVersion.Major -lt 6) {
    try {
        Remove-TypeData -TypeName System.Array -ErrorAction SilentlyContinue
    }
    catch {
        $null = $_
    }
}

# HRESULTs as the signed 32-bit values .NET reports in Exception.HResult.
$HResultDiskFull = -2147024784        # 0x80070070 ERROR_DISK_FULL
$HResultHandleDiskFull = -2147024857  # 0x80070027 ERROR_HANDLE_DISK_FULL
$HResultAccessDenied = -2147024891    # 0x80070005 ERROR_ACCESS_DENIED
$HResultFileNotFound = -2147024894    # 0x80070002 ERROR_FILE_NOT_FOUND
$HResultPathNotFound = -2147024893    # 0x80070003 ERROR_PATH_NOT_FOUND

$MaxSleepMilliseconds = 60000

# WTS_CONNECTSTATE_CLASS, in enum order (learn.microsoft.com/windows/win32/api/wtsapi32/ne-wtsapi32-wts_connectstate_class).
$SessionStates = @('Active', 'Connected', 'ConnectQuery', 'Shadow', 'Disconnected', 'Idle', 'Listen', 'Reset', 'Down', 'Init')

# --------------------------------------------------------------------------------------------------------------------
# Native helpers, compiled on first use only (Add-Type costs about a second on Windows PowerShell 5.1).
# --------------------------------------------------------------------------------------------------------------------

$NativeSource = @'
using System;
using System.Collections.Generic;
using System.ComponentModel;
using System.Runtime.InteropServices;

namespace Rdpfix.Agent
{
    public sealed class SessionRecord
    {
        public int Id;
        public int State;
        public string Station;
        public string User;
        public string Domain;
    }

    public sealed class KeyProviderInfo
    {
        public string Container;
        public string Provider;
        public int ProviderType;
        public int Flags;
        public int KeySpec;
    }

    public static class NativeMethods
    {
        private const int WTSUserName = 5;
        private const int WTSDomainName = 7;
        private const int CERT_KEY_PROV_INFO_PROP_ID = 2;

        [StructLayout(LayoutKind.Sequential)]
        private struct WTS_SESSION_INFO
        {
            public int SessionId;
            public IntPtr pWinStationName;
            public int State;
        }

        [StructLayout(LayoutKind.Sequential)]
        private struct CRYPT_KEY_PROV_INFO
        {
            public IntPtr pwszContainerName;
            public IntPtr pwszProvName;
            public int dwProvType;
            public int dwFlags;
            public int cProvParam;
            public IntPtr rgProvParam;
            public int dwKeySpec;
        }

        [DllImport("wtsapi32.dll", SetLastError = true)]
        private static extern bool WTSEnumerateSessionsW(IntPtr server, int reserved, int version, out IntPtr sessions, out int count);

        [DllImport("wtsapi32.dll", SetLastError = true)]
        private static extern bool WTSQuerySessionInformationW(IntPtr server, int sessionId, int infoClass, out IntPtr buffer, out int bytes);

        [DllImport("wtsapi32.dll")]
        private static extern void WTSFreeMemory(IntPtr memory);

        [DllImport("crypt32.dll", SetLastError = true)]
        private static extern bool CertGetCertificateContextProperty(IntPtr context, int propertyId, IntPtr data, ref int length);

        public static SessionRecord[] GetSessions()
        {
            IntPtr buffer;
            int count;
            // IntPtr.Zero is WTS_CURRENT_SERVER_HANDLE: the local host.
            if (!WTSEnumerateSessionsW(IntPtr.Zero, 0, 1, out buffer, out count))
            {
                throw new Win32Exception(Marshal.GetLastWin32Error());
            }
            try
            {
                List<SessionRecord> records = new List<SessionRecord>();
                int size = Marshal.SizeOf(typeof(WTS_SESSION_INFO));
                for (int index = 0; index < count; index++)
                {
                    IntPtr item = new IntPtr(buffer.ToInt64() + (long)index * size);
                    WTS_SESSION_INFO info = (WTS_SESSION_INFO)Marshal.PtrToStructure(item, typeof(WTS_SESSION_INFO));
                    SessionRecord record = new SessionRecord();
                    record.Id = info.SessionId;
                    record.State = info.State;
                    record.Station = Marshal.PtrToStringUni(info.pWinStationName);
                    record.User = QuerySessionString(info.SessionId, WTSUserName);
                    record.Domain = QuerySessionString(info.SessionId, WTSDomainName);
                    records.Add(record);
                }
                return records.ToArray();
            }
            finally
            {
                WTSFreeMemory(buffer);
            }
        }

        private static string QuerySessionString(int sessionId, int infoClass)
        {
            IntPtr buffer;
            int bytes;
            if (!WTSQuerySessionInformationW(IntPtr.Zero, sessionId, infoClass, out buffer, out bytes))
            {
                return null;
            }
            try
            {
                return Marshal.PtrToStringUni(buffer);
            }
            finally
            {
                WTSFreeMemory(buffer);
            }
        }

        // CERT_KEY_PROV_INFO_PROP_ID names the key container without opening the key, so it is known even when the
        // key file is missing or unreadable. Returns null when the certificate has no key link.
        public static KeyProviderInfo GetKeyProviderInfo(IntPtr certificateContext)
        {
            int length = 0;
            if (!CertGetCertificateContextProperty(certificateContext, CERT_KEY_PROV_INFO_PROP_ID, IntPtr.Zero, ref length))
            {
                return null;
            }
            IntPtr data = Marshal.AllocHGlobal(length);
            try
            {
                if (!CertGetCertificateContextProperty(certificateContext, CERT_KEY_PROV_INFO_PROP_ID, data, ref length))
                {
                    throw new Win32Exception(Marshal.GetLastWin32Error());
                }
                CRYPT_KEY_PROV_INFO info = (CRYPT_KEY_PROV_INFO)Marshal.PtrToStructure(data, typeof(CRYPT_KEY_PROV_INFO));
                KeyProviderInfo result = new KeyProviderInfo();
                result.Container = Marshal.PtrToStringUni(info.pwszContainerName);
                result.Provider = Marshal.PtrToStringUni(info.pwszProvName);
                result.ProviderType = info.dwProvType;
                result.Flags = info.dwFlags;
                result.KeySpec = info.dwKeySpec;
                return result;
            }
            finally
            {
                Marshal.FreeHGlobal(data);
            }
        }
    }
}
'@

function Initialize-NativeMethods {
    if (-not ('Rdpfix.Agent.NativeMethods' -as [type])) {
        Add-Type -TypeDefinition $NativeSource -Language CSharp
    }
}

# --------------------------------------------------------------------------------------------------------------------
# The caller's token and backup semantics. An elevated administrator holds SeBackupPrivilege and SeRestorePrivilege,
# but disabled; and a privilege only helps a file open that asks for it: SeBackupPrivilege lets CreateFile read a
# file whose DACL refuses the caller only with FILE_FLAG_BACKUP_SEMANTICS, which .NET's File.Open, File.Copy and
# File.ReadAllBytes never pass (learn.microsoft.com/windows/win32/api/fileapi/nf-fileapi-createfilew, "To open a file
# for backup"). From build 17763 the RDP key file's ACL names no Administrators entry, so every read, hash, copy and
# ACL read of a key file goes through Open-BackupReadStream / Read-FileSecurity below.
# --------------------------------------------------------------------------------------------------------------------

# The privileges the agent enables, once per run, before the first operation that needs them (a token that does not
# hold one simply goes without: system.info says which are held and which are enabled).
$AgentPrivileges = @('SeBackupPrivilege', 'SeRestorePrivilege')
$AgentToken = @{ Initialized = $false; Enabled = @() }

$TokenSource = @'
using System;
using System.Collections.Generic;
using System.ComponentModel;
using System.IO;
using System.Runtime.InteropServices;
using System.Security.Principal;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace Rdpfix.Agent
{
    public sealed class PrivilegeState
    {
        public string Name;
        public bool Enabled;
    }

    public static class Token
    {
        private const int TOKEN_QUERY = 0x8;
        private const int TOKEN_ADJUST_PRIVILEGES = 0x20;
        private const int TOKEN_INFORMATION_PRIVILEGES = 3;
        private const int SE_PRIVILEGE_ENABLED = 0x2;
        private const int ERROR_NOT_ALL_ASSIGNED = 1300;

        [StructLayout(LayoutKind.Sequential)]
        private struct LUID
        {
            public uint LowPart;
            public int HighPart;
        }

        [StructLayout(LayoutKind.Sequential)]
        private struct LUID_AND_ATTRIBUTES
        {
            public LUID Luid;
            public int Attributes;
        }

        [StructLayout(LayoutKind.Sequential)]
        private struct TOKEN_PRIVILEGES_ONE
        {
            public int PrivilegeCount;
            public LUID_AND_ATTRIBUTES Privilege;
        }

        [DllImport("kernel32.dll")]
        private static extern IntPtr GetCurrentProcess();

        [DllImport("kernel32.dll", SetLastError = true)]
        private static extern bool CloseHandle(IntPtr handle);

        [DllImport("advapi32.dll", SetLastError = true)]
        private static extern bool OpenProcessToken(IntPtr process, int access, out IntPtr token);

        [DllImport("advapi32.dll", SetLastError = true, CharSet = CharSet.Unicode)]
        private static extern bool LookupPrivilegeValueW(string system, string name, out LUID luid);

        [DllImport("advapi32.dll", SetLastError = true, CharSet = CharSet.Unicode)]
        private static extern bool LookupPrivilegeNameW(string system, ref LUID luid, StringBuilder name, ref int length);

        [DllImport("advapi32.dll", SetLastError = true)]
        private static extern bool AdjustTokenPrivileges(IntPtr token, bool disableAll, ref TOKEN_PRIVILEGES_ONE state, int length, IntPtr previous, IntPtr returned);

        [DllImport("advapi32.dll", SetLastError = true)]
        private static extern bool GetTokenInformation(IntPtr token, int infoClass, IntPtr buffer, int length, out int returned);

        private static IntPtr OpenToken(int access)
        {
            IntPtr token;
            if (!OpenProcessToken(GetCurrentProcess(), access, out token))
            {
                throw new Win32Exception(Marshal.GetLastWin32Error());
            }
            return token;
        }

        // Enables a privilege of the process token. False when the token does not hold it: AdjustTokenPrivileges
        // then succeeds with ERROR_NOT_ALL_ASSIGNED and enables nothing.
        public static bool Enable(string name)
        {
            IntPtr token = OpenToken(TOKEN_ADJUST_PRIVILEGES | TOKEN_QUERY);
            try
            {
                TOKEN_PRIVILEGES_ONE state = new TOKEN_PRIVILEGES_ONE();
                state.PrivilegeCount = 1;
                state.Privilege.Attributes = SE_PRIVILEGE_ENABLED;
                if (!LookupPrivilegeValueW(null, name, out state.Privilege.Luid))
                {
                    throw new Win32Exception(Marshal.GetLastWin32Error());
                }
                if (!AdjustTokenPrivileges(token, false, ref state, 0, IntPtr.Zero, IntPtr.Zero))
                {
                    throw new Win32Exception(Marshal.GetLastWin32Error());
                }
                return Marshal.GetLastWin32Error() != ERROR_NOT_ALL_ASSIGNED;
            }
            finally
            {
                CloseHandle(token);
            }
        }

        // Every privilege the process token holds, and whether it is enabled now.
        public static PrivilegeState[] Privileges()
        {
            IntPtr token = OpenToken(TOKEN_QUERY);
            try
            {
                int length;
                GetTokenInformation(token, TOKEN_INFORMATION_PRIVILEGES, IntPtr.Zero, 0, out length);
                IntPtr buffer = Marshal.AllocHGlobal(length);
                try
                {
                    if (!GetTokenInformation(token, TOKEN_INFORMATION_PRIVILEGES, buffer, length, out length))
                    {
                        throw new Win32Exception(Marshal.GetLastWin32Error());
                    }
                    int count = Marshal.ReadInt32(buffer);
                    int size = Marshal.SizeOf(typeof(LUID_AND_ATTRIBUTES));
                    List<PrivilegeState> states = new List<PrivilegeState>();
                    for (int index = 0; index < count; index++)
                    {
                        IntPtr item = new IntPtr(buffer.ToInt64() + 4 + (long)index * size);
                        LUID_AND_ATTRIBUTES entry = (LUID_AND_ATTRIBUTES)Marshal.PtrToStructure(item, typeof(LUID_AND_ATTRIBUTES));
                        int nameLength = 128;
                        StringBuilder name = new StringBuilder(nameLength);
                        if (!LookupPrivilegeNameW(null, ref entry.Luid, name, ref nameLength))
                        {
                            continue;
                        }
                        PrivilegeState state = new PrivilegeState();
                        state.Name = name.ToString();
                        state.Enabled = (entry.Attributes & SE_PRIVILEGE_ENABLED) != 0;
                        states.Add(state);
                    }
                    return states.ToArray();
                }
                finally
                {
                    Marshal.FreeHGlobal(buffer);
                }
            }
            finally
            {
                CloseHandle(token);
            }
        }
    }

    // Files opened with backup intent: CreateFile with FILE_FLAG_BACKUP_SEMANTICS, so that an enabled
    // SeBackupPrivilege grants read access whatever the DACL says (without the privilege the DACL decides, as for any
    // open). The flag also opens folders, so ACL reads of folders go the same way.
    public static class BackupFile
    {
        private const uint GENERIC_READ = 0x80000000;
        private const uint READ_CONTROL = 0x00020000;
        private const uint FILE_SHARE_ALL = 0x7;
        private const uint OPEN_EXISTING = 3;
        private const uint FILE_FLAG_BACKUP_SEMANTICS = 0x02000000;
        private const int SE_FILE_OBJECT = 1;
        private const int OWNER_GROUP_DACL = 0x1 | 0x2 | 0x4;
        private const int SDDL_REVISION_1 = 1;

        [DllImport("kernel32.dll", SetLastError = true, CharSet = CharSet.Unicode)]
        private static extern SafeFileHandle CreateFileW(string name, uint access, uint share, IntPtr security, uint disposition, uint flags, IntPtr template);

        [DllImport("advapi32.dll")]
        private static extern int GetSecurityInfo(SafeFileHandle handle, int objectType, int information, out IntPtr owner, out IntPtr group, out IntPtr dacl, out IntPtr sacl, out IntPtr descriptor);

        [DllImport("advapi32.dll", SetLastError = true, CharSet = CharSet.Unicode)]
        private static extern bool ConvertSecurityDescriptorToStringSecurityDescriptorW(IntPtr descriptor, int revision, int information, out IntPtr text, out int length);

        [DllImport("kernel32.dll")]
        private static extern IntPtr LocalFree(IntPtr memory);

        private static SafeFileHandle Open(string path, uint access)
        {
            SafeFileHandle handle = CreateFileW(path, access, FILE_SHARE_ALL, IntPtr.Zero, OPEN_EXISTING, FILE_FLAG_BACKUP_SEMANTICS, IntPtr.Zero);
            if (handle.IsInvalid)
            {
                int error = Marshal.GetLastWin32Error();
                handle.Dispose();
                throw new Win32Exception(error);
            }
            return handle;
        }

        public static FileStream OpenRead(string path)
        {
            return new FileStream(Open(path, GENERIC_READ), FileAccess.Read);
        }

        // { owner SID, SDDL of owner, group and DACL }, as Get-Acl's Owner and Sddl would show them.
        public static string[] ReadSecurity(string path)
        {
            using (SafeFileHandle handle = Open(path, READ_CONTROL))
            {
                IntPtr owner;
                IntPtr group;
                IntPtr dacl;
                IntPtr sacl;
                IntPtr descriptor;
                int error = GetSecurityInfo(handle, SE_FILE_OBJECT, OWNER_GROUP_DACL, out owner, out group, out dacl, out sacl, out descriptor);
                if (error != 0)
                {
                    throw new Win32Exception(error);
                }
                try
                {
                    IntPtr text;
                    int length;
                    if (!ConvertSecurityDescriptorToStringSecurityDescriptorW(descriptor, SDDL_REVISION_1, OWNER_GROUP_DACL, out text, out length))
                    {
                        throw new Win32Exception(Marshal.GetLastWin32Error());
                    }
                    try
                    {
                        string ownerSid = owner == IntPtr.Zero ? null : new SecurityIdentifier(owner).Value;
                        return new string[] { ownerSid, Marshal.PtrToStringUni(text) };
                    }
                    finally
                    {
                        LocalFree(text);
                    }
                }
                finally
                {
                    LocalFree(descriptor);
                }
            }
        }
    }
}
'@

# Compiles the token helpers and enables the agent's privileges, once per run.
function Initialize-AgentToken {
    if ($AgentToken.Initialized) {
        return
    }
    if (-not ('Rdpfix.Agent.BackupFile' -as [type])) {
        Add-Type -TypeDefinition $TokenSource -Language CSharp
    }
    $enabled = New-Object System.Collections.Generic.List[string]
    foreach ($privilege in $AgentPrivileges) {
        if ([Rdpfix.Agent.Token]::Enable($privilege)) {
            $enabled.Add($privilege)
        }
    }
    $AgentToken.Enabled = $enabled.ToArray()
    $AgentToken.Initialized = $true
}

# THE way the agent reads a file's bytes: opened with backup semantics (see above).
function Open-BackupReadStream {
    param([string]$Path)
    Initialize-AgentToken
    return [Rdpfix.Agent.BackupFile]::OpenRead($Path)
}

function Read-FileBytes {
    param([string]$Path)
    $stream = Open-BackupReadStream -Path $Path
    try {
        $buffer = New-Object System.IO.MemoryStream
        $stream.CopyTo($buffer)
        return , $buffer.ToArray()
    }
    finally {
        $stream.Dispose()
    }
}

# An account name for a SID as Get-Acl shows owners (localised on non-English Windows: information only), or the SID
# itself when it has no name.
function Get-AccountName {
    param([string]$Sid)
    if (-not $Sid) {
        return $null
    }
    try {
        return [string](New-Object System.Security.Principal.SecurityIdentifier($Sid)).Translate([System.Security.Principal.NTAccount]).Value
    }
    catch {
        return $Sid
    }
}

# Owner (as an account name) and SDDL of a file or folder, read with backup semantics.
function Read-FileSecurity {
    param([string]$Path)
    Initialize-AgentToken
    $security = [Rdpfix.Agent.BackupFile]::ReadSecurity($Path)
    return @{ Owner = Get-AccountName -Sid $security[0]; Sddl = [string]$security[1] }
}

# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------

# What a failing operation still reports (a guard's actual value, a lock's holder): set just before it throws, written
# as the failed result's data by Invoke-Batch, cleared before every operation.
$AgentErrorData = @{ Value = $null }

# An exception carrying one of the protocol's error types; Get-AgentErrorType reads the tag back.
function Add-FolderClaim {
    # dir.create's claim: the named file created inside the folder with FileMode.CreateNew, which Windows makes atomic
    # (CreateFile with CREATE_NEW): of two callers, exactly one creates it, the other gets ERROR_FILE_EXISTS. The folder
    # itself cannot serve: Directory.CreateDirectory succeeds on an existing folder, and a test then a create races.
    # The loser fails (AlreadyClaimed), or with -MustClaim $false is told so: $false.
    param([string]$Folder, [string]$Name, [string]$Text, [bool]$MustClaim)
    $claimPath = [System.IO.Path]::Combine($Folder, $Name)
    try {
        $stream = New-Object System.IO.FileStream ($claimPath, [System.IO.FileMode]::CreateNew, [System.IO.FileAccess]::Write, [System.IO.FileShare]::None)
    }
    catch [System.IO.IOException] {
        if ([System.IO.File]::Exists($claimPath)) {
            if (-not $MustClaim) {
                return $false
            }
            # Reported, not judged: the controller tells its own claim (an earlier execution of this same batch) from
            # another run's. $null when it cannot be read (its creator still holds it open, FileShare.None).
            $existing = $null
            try {
                $existing = (New-Object System.Text.UTF8Encoding $false).GetString((Read-FileBytes -Path $claimPath))
            }
            catch {
                $existing = $null
            }
            $AgentErrorData.Value = [ordered]@{ claim_text = $existing }
            throw (New-AgentException 'AlreadyClaimed' "'$claimPath' exists: the folder was claimed first")
        }
        throw
    }
    try {
        if ($Text) {
            $bytes = (New-Object System.Text.UTF8Encoding $false).GetBytes($Text)
            $stream.Write($bytes, 0, $bytes.Length)
        }
    }
    finally {
        $stream.Dispose()
    }
    return $true
}

function New-AgentException {
    param([string]$Type, [string]$Message)
    $exception = New-Object System.Exception $Message
    $exception.Data['RdpfixErrorType'] = $Type
    return $exception
}

function Get-WrappedErrorType {
    param($Exception)
    $typeName = $Exception.GetType().FullName
    if ($null -ne $Exception.Data -and $Exception.Data.Contains('RdpfixErrorType')) {
        return [string]$Exception.Data['RdpfixErrorType']
    }
    if ($Exception -is [System.UnauthorizedAccessException] -or $Exception -is [System.Security.SecurityException]) {
        return 'AccessDenied'
    }
    if ($Exception -is [System.Management.Automation.ItemNotFoundException] -or
        $Exception -is [System.IO.FileNotFoundException] -or
        $Exception -is [System.IO.DirectoryNotFoundException]) {
        return 'NotFound'
    }
    if ($Exception -is [System.IO.IOException] -and
        ($Exception.HResult -eq $HResultDiskFull -or $Exception.HResult -eq $HResultHandleDiskFull)) {
        return 'DiskFull'
    }
    if ($Exception -is [System.ArgumentException] -or $Exception -is [System.FormatException]) {
        return 'InvalidArgument'
    }
    if ($Exception -is [System.TimeoutException]) {
        return 'Timeout'
    }
    if ($Exception -is [System.PlatformNotSupportedException] -or $Exception -is [System.NotSupportedException]) {
        return 'Unsupported'
    }
    # WMI through System.Management (Set-WmiInstance) and through CIM (Get-CimInstance) report their own codes;
    # the listener's "Invalid Parameter" for a certificate missing from LocalMachine\My arrives this way.
    $wmiCode = $null
    if ($typeName -eq 'System.Management.ManagementException') {
        $wmiCode = [string]$Exception.ErrorCode
    }
    elseif ($typeName -eq 'Microsoft.Management.Infrastructure.CimException') {
        $wmiCode = [string]$Exception.NativeErrorCode
    }
    if ($wmiCode -eq 'AccessDenied') { return 'AccessDenied' }
    if ($wmiCode -eq 'NotFound' -or $wmiCode -eq 'InvalidClass' -or $wmiCode -eq 'InvalidNamespace') { return 'NotFound' }
    if ($wmiCode -eq 'InvalidParameter') { return 'InvalidArgument' }
    if ($Exception -is [System.ComponentModel.Win32Exception]) {
        switch ($Exception.NativeErrorCode) {
            5 { return 'AccessDenied' }
            2 { return 'NotFound' }
            3 { return 'NotFound' }
            112 { return 'DiskFull' }
        }
    }
    switch ($Exception.HResult) {
        $HResultAccessDenied { return 'AccessDenied' }
        $HResultFileNotFound { return 'NotFound' }
        $HResultPathNotFound { return 'NotFound' }
        $HResultDiskFull { return 'DiskFull' }
    }
    return $null
}

# Maps an ErrorRecord to a protocol error type, looking through wrapping exceptions (MethodInvocationException wraps
# every exception thrown by a .NET method called from PowerShell).
function Get-AgentErrorType {
    param($ErrorRecord)
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        $type = Get-WrappedErrorType -Exception $exception
        if ($type) {
            return $type
        }
        $exception = $exception.InnerException
    }
    switch ([string]$ErrorRecord.CategoryInfo.Category) {
        'PermissionDenied' { return 'AccessDenied' }
        'ObjectNotFound' { return 'NotFound' }
        'InvalidArgument' { return 'InvalidArgument' }
        'OperationTimeout' { return 'Timeout' }
    }
    return 'Failed'
}

# --------------------------------------------------------------------------------------------------------------------
# Arguments and values
# --------------------------------------------------------------------------------------------------------------------

function ConvertTo-ArgumentTable {
    param($Arguments)
    $table = @{}
    if ($null -ne $Arguments) {
        foreach ($property in $Arguments.PSObject.Properties) {
            $table[$property.Name] = $property.Value
        }
    }
    return $table
}

# One argument of an operation. The leading comma keeps a list a list when PowerShell returns it.
function Get-OpArgument {
    param([hashtable]$Table, [string]$Name, $Default = $null, [switch]$Required)
    if ($Table.ContainsKey($Name) -and $null -ne $Table[$Name]) {
        return , $Table[$Name]
    }
    if ($Required) {
        throw (New-AgentException 'InvalidArgument' "missing argument '$Name'")
    }
    return , $Default
}

# A string argument. A missing optional one comes back as $Default, or '' (PowerShell's [string] of $null).
function Get-StringArgument {
    param([hashtable]$Table, [string]$Name, [string]$Default = '', [switch]$Required, [switch]$NotEmpty)
    $value = Get-OpArgument -Table $Table -Name $Name -Default $Default -Required:$Required
    if ($value -isnot [string]) {
        throw (New-AgentException 'InvalidArgument' "argument '$Name' must be a string")
    }
    if ($NotEmpty -and $value.Length -eq 0) {
        throw (New-AgentException 'InvalidArgument' "argument '$Name' must not be empty")
    }
    return $value
}

# Upper-case hex SHA-1 without separators, as the protocol states thumbprints.
function Get-ThumbprintArgument {
    param([hashtable]$Table)
    $thumbprint = Get-StringArgument -Table $Table -Name 'thumbprint' -Required -NotEmpty
    if ($thumbprint -notmatch '^[0-9A-Fa-f]{40}$') {
        throw (New-AgentException 'InvalidArgument' "thumbprint '$thumbprint' is not 40 hex digits")
    }
    return $thumbprint.ToUpperInvariant()
}

function Get-StoreArgument {
    param([hashtable]$Table)
    $store = Get-StringArgument -Table $Table -Name 'store' -Required -NotEmpty
    # Store names travel to certutil and the Cert: drive: no path separators, quotes or wildcards.
    if ($store -notmatch '^[A-Za-z0-9 _.-]+$') {
        throw (New-AgentException 'InvalidArgument' "certificate store name '$store' is not valid")
    }
    return $store
}

function ConvertTo-IsoUtc {
    param($Date)
    if ($null -eq $Date) {
        return $null
    }
    return ([datetime]$Date).ToUniversalTime().ToString("yyyy-MM-dd'T'HH:mm:ss'Z'", [System.Globalization.CultureInfo]::InvariantCulture)
}

function ConvertTo-HexString {
    param([byte[]]$Bytes)
    if ($null -eq $Bytes -or $Bytes.Length -eq 0) {
        return ''
    }
    return ([System.BitConverter]::ToString($Bytes)).Replace('-', '').ToLowerInvariant()
}

function ConvertFrom-HexString {
    param([string]$Hex)
    if ($Hex -notmatch '^([0-9A-Fa-f]{2})*$') {
        throw (New-AgentException 'InvalidArgument' 'REG_BINARY values are hex strings with an even number of digits')
    }
    $bytes = New-Object byte[] ($Hex.Length / 2)
    for ($index = 0; $index -lt $bytes.Length; $index++) {
        $bytes[$index] = [System.Convert]::ToByte($Hex.Substring($index * 2, 2), 16)
    }
    return , $bytes
}

function Get-Sha256Hex {
    param([byte[]]$Bytes)
    $algorithm = [System.Security.Cryptography.SHA256]::Create()
    try {
        return ConvertTo-HexString -Bytes ($algorithm.ComputeHash($Bytes))
    }
    finally {
        $algorithm.Dispose()
    }
}

function Get-FileSha256Hex {
    param([string]$Path)
    # Backup semantics: a key file whose ACL leaves Administrators out can still be hashed; the helper shares read,
    # write and delete, so a file held open by a service can be hashed too.
    $stream = Open-BackupReadStream -Path $Path
    $algorithm = [System.Security.Cryptography.SHA256]::Create()
    try {
        return ConvertTo-HexString -Bytes ($algorithm.ComputeHash($stream))
    }
    finally {
        $stream.Dispose()
        $algorithm.Dispose()
    }
}

function ConvertFrom-Base64Argument {
    param([hashtable]$Table, [string]$Name)
    $text = Get-StringArgument -Table $Table -Name $Name -Required
    try {
        return , ([System.Convert]::FromBase64String($text))
    }
    catch {
        throw (New-AgentException 'InvalidArgument' "argument '$Name' is not valid base64")
    }
}

# --------------------------------------------------------------------------------------------------------------------
# File system
# --------------------------------------------------------------------------------------------------------------------

# Get-Item, or $null when the item does not exist. Test-Path is not used because it answers $false for a path it
# may not read, which would hide an access problem behind "absent".
function Get-ItemOrNull {
    param([string]$Path)
    try {
        return Get-Item -LiteralPath $Path -Force -ErrorAction Stop
    }
    catch [System.Management.Automation.ItemNotFoundException] {
        return $null
    }
}

# Owner and SDDL of a file or folder, each $null when its security descriptor may not be read (a key file whose ACL
# locks out Administrators is exactly what the planners look for, so the rest of the record must still arrive).
function Get-SecurityRecord {
    param([string]$Path)
    $record = [ordered]@{ owner = $null; sddl = $null }
    try {
        # Backup semantics, not Get-Acl: from build 17763 the RDP key file grants Administrators nothing, not even
        # READ_CONTROL, so Get-Acl would answer AccessDenied on every healthy host.
        $security = Read-FileSecurity -Path $Path
        # [string]: a plain string, never a PSObject that ConvertTo-Json on 5.1 could write as an object.
        $record.owner = [string]$security.Owner
        $record.sddl = [string]$security.Sddl
    }
    catch {
        if ((Get-AgentErrorType -ErrorRecord $_) -ne 'AccessDenied') {
            throw
        }
    }
    return $record
}

# Writes bytes next to the destination under a temporary name, then moves them into place, so a failure (disk
# full, access denied) never leaves a partial destination file.
function Write-FileAtomically {
    param([string]$Path, [byte[]]$Bytes, [string]$SourcePath)
    $fullPath = [System.IO.Path]::GetFullPath($Path)
    $folder = [System.IO.Path]::GetDirectoryName($fullPath)
    if (-not [System.IO.Directory]::Exists($folder)) {
        throw (New-Object System.IO.DirectoryNotFoundException "folder '$folder' does not exist")
    }
    $temporary = [System.IO.Path]::Combine($folder, '.' + [System.IO.Path]::GetFileName($fullPath) + '.rdpfix-' + [guid]::NewGuid().ToString('N') + '.tmp')
    try {
        # A copy reads its source with backup semantics (a key file Administrators may not read is still copied).
        $source = $null
        if ($SourcePath) {
            $source = Open-BackupReadStream -Path $SourcePath
        }
        try {
            $stream = New-Object System.IO.FileStream($temporary, [System.IO.FileMode]::CreateNew, [System.IO.FileAccess]::Write, [System.IO.FileShare]::None)
            try {
                if ($null -ne $source) {
                    $source.CopyTo($stream)
                }
                else {
                    $stream.Write($Bytes, 0, $Bytes.Length)
                }
                # Flush to disk here: a full disk must fail before the destination is touched.
                $stream.Flush($true)
            }
            finally {
                $stream.Dispose()
            }
        }
        finally {
            if ($null -ne $source) {
                $source.Dispose()
            }
        }
        if ([System.IO.File]::Exists($fullPath)) {
            # File.Replace keeps the replaced file's ACL, so rewriting a file does not widen or narrow who may read it.
            # [NullString]::Value: PowerShell would pass $null to a string parameter as '' (no backup file wanted).
            [System.IO.File]::Replace($temporary, $fullPath, [NullString]::Value)
        }
        else {
            [System.IO.File]::Move($temporary, $fullPath)
        }
    }
    finally {
        if ([System.IO.File]::Exists($temporary)) {
            try {
                [System.IO.File]::Delete($temporary)
            }
            catch {
                # The original error (disk full, access denied) is the one to report, not this clean-up's.
                $null = $_
            }
        }
    }
    return $fullPath
}

# A DirectorySecurity holding exactly the parts the SDDL states (owner, group, DACL), so that applying it writes only
# those parts; an SDDL without an owner leaves the folder's owner alone. A SACL is never applied (it would need
# SeSecurityPrivilege).
function ConvertTo-DirectorySecurity {
    param([string]$Sddl)
    $descriptor = New-Object System.Security.AccessControl.RawSecurityDescriptor($Sddl)
    $sections = [System.Security.AccessControl.AccessControlSections]::None
    if ($null -ne $descriptor.Owner) {
        $sections = $sections -bor [System.Security.AccessControl.AccessControlSections]::Owner
    }
    if ($null -ne $descriptor.Group) {
        $sections = $sections -bor [System.Security.AccessControl.AccessControlSections]::Group
    }
    if ($null -ne $descriptor.DiscretionaryAcl) {
        $sections = $sections -bor [System.Security.AccessControl.AccessControlSections]::Access
    }
    $security = New-Object System.Security.AccessControl.DirectorySecurity
    $security.SetSecurityDescriptorSddlForm($Sddl, $sections)
    return $security
}

# DirectoryInfo.SetAccessControl on .NET Framework; the same call lives in FileSystemAclExtensions on .NET.
function Set-DirectorySecurity {
    param([System.IO.DirectoryInfo]$Directory, $Security)
    if ($null -ne $Directory.PSObject.Methods['SetAccessControl']) {
        $Directory.SetAccessControl($Security)
    }
    else {
        # pitfall-ok: newer-than-net452 reached only where DirectoryInfo has no SetAccessControl (.NET, PowerShell 7)
        [System.IO.FileSystemAclExtensions]::SetAccessControl($Directory, $Security)
    }
}

# Runs an ACL write. .NET reports ERROR_INVALID_OWNER (an owner the token may not set: SeRestorePrivilege not held or
# not enabled) as an InvalidOperationException; the protocol calls it AccessDenied.
function Invoke-SecurityWrite {
    param([scriptblock]$Action)
    try {
        & $Action
    }
    catch [System.InvalidOperationException] {
        throw (New-AgentException 'AccessDenied' ('the owner cannot be set (SeRestorePrivilege is needed to set an owner other than yourself): ' + $_.Exception.Message))
    }
}

# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------

# Splits a provider path (HKLM:\SOFTWARE\...) into hive and subkey for Microsoft.Win32.RegistryKey, which gives the
# value kinds that Get-ItemProperty hides.
function Get-RegistryLocation {
    param([string]$Path)
    $match = [regex]::Match($Path, '^(?:Registry::)?(HKLM|HKEY_LOCAL_MACHINE|HKCU|HKEY_CURRENT_USER|HKCR|HKEY_CLASSES_ROOT|HKU|HKEY_USERS|HKCC|HKEY_CURRENT_CONFIG):?(?:\\(.*))?$', 'IgnoreCase')
    if (-not $match.Success) {
        throw (New-AgentException 'InvalidArgument' "'$Path' is not a registry path such as HKLM:\SOFTWARE")
    }
    $hive = switch ($match.Groups[1].Value.ToUpperInvariant()) {
        { $_ -in 'HKLM', 'HKEY_LOCAL_MACHINE' } { [Microsoft.Win32.RegistryHive]::LocalMachine }
        { $_ -in 'HKCU', 'HKEY_CURRENT_USER' } { [Microsoft.Win32.RegistryHive]::CurrentUser }
        { $_ -in 'HKCR', 'HKEY_CLASSES_ROOT' } { [Microsoft.Win32.RegistryHive]::ClassesRoot }
        { $_ -in 'HKU', 'HKEY_USERS' } { [Microsoft.Win32.RegistryHive]::Users }
        { $_ -in 'HKCC', 'HKEY_CURRENT_CONFIG' } { [Microsoft.Win32.RegistryHive]::CurrentConfig }
    }
    return @{ Hive = $hive; SubKey = $match.Groups[2].Value.Trim('\') }
}

# The 64-bit view explicitly, so a 32-bit host process still sees the keys Windows itself uses.
function Open-RegistryBaseKey {
    param($Location)
    return [Microsoft.Win32.RegistryKey]::OpenBaseKey($Location.Hive, [Microsoft.Win32.RegistryView]::Registry64)
}

function Get-RegistryValueRecord {
    param([Microsoft.Win32.RegistryKey]$Key, [string]$Name)
    $kind = $Key.GetValueKind($Name)
    # Unexpanded, so REG_EXPAND_SZ round-trips exactly.
    $raw = $Key.GetValue($Name, $null, [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
    switch ([string]$kind) {
        'String' { return [ordered]@{ type = 'REG_SZ'; value = [string]$raw } }
        'ExpandString' { return [ordered]@{ type = 'REG_EXPAND_SZ'; value = [string]$raw } }
        'MultiString' {
            $list = New-Object System.Collections.Generic.List[object]
            if ($null -ne $raw) {
                foreach ($line in $raw) { $list.Add([string]$line) }
            }
            return [ordered]@{ type = 'REG_MULTI_SZ'; value = $list.ToArray() }
        }
        # RegistryKey returns REG_DWORD and REG_QWORD as signed integers; the protocol carries them unsigned.
        'DWord' { return [ordered]@{ type = 'REG_DWORD'; value = [System.BitConverter]::ToUInt32([System.BitConverter]::GetBytes([int]$raw), 0) } }
        'QWord' { return [ordered]@{ type = 'REG_QWORD'; value = [System.BitConverter]::ToUInt64([System.BitConverter]::GetBytes([long]$raw), 0) } }
        'Binary' { return [ordered]@{ type = 'REG_BINARY'; value = (ConvertTo-HexString -Bytes $raw) } }
    }
    # REG_NONE and other raw kinds come back as bytes: reported as such rather than guessed at.
    return [ordered]@{ type = 'REG_NONE'; value = (ConvertTo-HexString -Bytes ([byte[]]$raw)) }
}

function ConvertTo-RegistryData {
    param([string]$Type, $Value)
    if ($null -eq $Value) {
        throw (New-AgentException 'InvalidArgument' 'argument value is required')
    }
    switch ($Type) {
        'REG_SZ' { return @{ Kind = [Microsoft.Win32.RegistryValueKind]::String; Data = [string]$Value } }
        'REG_EXPAND_SZ' { return @{ Kind = [Microsoft.Win32.RegistryValueKind]::ExpandString; Data = [string]$Value } }
        'REG_MULTI_SZ' {
            if ($Value -isnot [System.Array]) {
                throw (New-AgentException 'InvalidArgument' 'REG_MULTI_SZ values are lists of strings')
            }
            return @{ Kind = [Microsoft.Win32.RegistryValueKind]::MultiString; Data = [string[]]$Value }
        }
        'REG_BINARY' {
            if ($Value -isnot [string]) {
                throw (New-AgentException 'InvalidArgument' 'REG_BINARY values are hex strings')
            }
            return @{ Kind = [Microsoft.Win32.RegistryValueKind]::Binary; Data = (ConvertFrom-HexString -Hex $Value) }
        }
        { $_ -in 'REG_DWORD', 'REG_QWORD' } {
            if ($Value -is [string] -or $Value -is [bool] -or $Value -is [System.Array]) {
                throw (New-AgentException 'InvalidArgument' "$Type values are integers")
            }
            $number = [decimal]$Value
            $limit = if ($Type -eq 'REG_DWORD') { [decimal][uint32]::MaxValue } else { [decimal][uint64]::MaxValue }
            if ($number -ne [decimal]::Truncate($number) -or $number -lt 0 -or $number -gt $limit) {
                throw (New-AgentException 'InvalidArgument' "$Type value $Value is out of range")
            }
            # SetValue wants the signed integer with the same bits.
            if ($Type -eq 'REG_DWORD') {
                return @{ Kind = [Microsoft.Win32.RegistryValueKind]::DWord; Data = [System.BitConverter]::ToInt32([System.BitConverter]::GetBytes([uint32]$number), 0) }
            }
            return @{ Kind = [Microsoft.Win32.RegistryValueKind]::QWord; Data = [System.BitConverter]::ToInt64([System.BitConverter]::GetBytes([uint64]$number), 0) }
        }
    }
    throw (New-AgentException 'InvalidArgument' "registry type '$Type' is not one of REG_SZ, REG_EXPAND_SZ, REG_MULTI_SZ, REG_DWORD, REG_QWORD, REG_BINARY")
}

function Test-RegistryValueName {
    param([Microsoft.Win32.RegistryKey]$Key, [string]$Name)
    # -contains compares case-insensitively, as Windows does for value names.
    return (@($Key.GetValueNames()) -contains $Name)
}

# --------------------------------------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------------------------------------

function Get-StorePath {
    param([string]$Store)
    return 'Cert:\LocalMachine\' + $Store
}

function Open-X509Store {
    param([string]$Store, [System.Security.Cryptography.X509Certificates.OpenFlags]$Flags)
    $x509Store = New-Object System.Security.Cryptography.X509Certificates.X509Store($Store, [System.Security.Cryptography.X509Certificates.StoreLocation]::LocalMachine)
    $x509Store.Open($Flags)
    return $x509Store
}

function Find-StoreCertificate {
    param($X509Store, [string]$Thumbprint)
    foreach ($certificate in $X509Store.Certificates) {
        if ($certificate.Thumbprint -eq $Thumbprint) {
            return $certificate
        }
    }
    return $null
}

# Where a key's file lives. Only the Microsoft software providers keep machine keys as files here; for any other
# provider (smart card, TPM) the path is unknown and reported as null.
# CAPI: %ProgramData%\Microsoft\Crypto\RSA\MachineKeys (DSS providers: ...\DSS\MachineKeys);
# CNG: %ProgramData%\Microsoft\Crypto\Keys (learn.microsoft.com/windows/win32/seccng/key-storage-and-retrieval).
function Get-KeyFilePath {
    param([string]$Kind, [string]$Provider, $ProviderType, [string]$UniqueName)
    if (-not $UniqueName) {
        return $null
    }
    if ($Kind -eq 'capi' -and $Provider -like 'Microsoft*Cryptographic Provider*') {
        # PROV_DSS (3), PROV_DSS_DH (13) and PROV_DH_SCHANNEL (18) keep their keys apart from the RSA types.
        $family = if (@(3, 13, 18) -contains $ProviderType) { 'DSS' } else { 'RSA' }
        return [System.IO.Path]::Combine($env:ProgramData, "Microsoft\Crypto\$family\MachineKeys", $UniqueName)
    }
    if ($Kind -eq 'cng' -and $Provider -eq 'Microsoft Software Key Storage Provider') {
        return [System.IO.Path]::Combine($env:ProgramData, 'Microsoft\Crypto\Keys', $UniqueName)
    }
    return $null
}

# The unique (file) name of a CAPI key container named by the certificate's key link.
function Get-CapiUniqueName {
    param($Certificate, $ProviderInfo)
    try {
        # X509Certificate2.PrivateKey is the CAPI provider itself on .NET Framework (Windows PowerShell 5.1).
        $privateKey = $Certificate.PrivateKey
        if ($null -ne $privateKey -and $null -ne $privateKey.PSObject.Properties['CspKeyContainerInfo']) {
            return $privateKey.CspKeyContainerInfo.UniqueKeyContainerName
        }
    }
    catch {
        $null = $_
    }
    # On .NET (PowerShell 7) PrivateKey is a CNG wrapper: open the same container through CspParameters.
    $parameters = New-Object System.Security.Cryptography.CspParameters($ProviderInfo.ProviderType, $ProviderInfo.Provider, $ProviderInfo.Container)
    $parameters.Flags = [System.Security.Cryptography.CspProviderFlags]::UseMachineKeyStore -bor [System.Security.Cryptography.CspProviderFlags]::UseExistingKey
    $parameters.KeyNumber = $ProviderInfo.KeySpec
    $provider = New-Object System.Security.Cryptography.RSACryptoServiceProvider($parameters)
    # A container opened by name is kept on Dispose only while PersistKeyInCsp is true: say so explicitly, since
    # deleting a machine key is exactly what must never happen here.
    $provider.PersistKeyInCsp = $true
    try {
        return $provider.CspKeyContainerInfo.UniqueKeyContainerName
    }
    finally {
        $provider.Dispose()
    }
}

# The file name Windows gives a CAPI machine key container: the MD5 of the lower-cased container name with its
# terminating NUL, written as four little-endian 32-bit words in hex, then '_' and the MachineGuid. Microsoft does not
# state this as a rule (UNCONFIRMED); it reproduces the documented file of the RDP self-signed key,
# MachineKeys\f686aace6942fb7f7ceb231212eef4a4_<MachineGuid> for container TSSecKeySet1. Used only when the container
# cannot be opened (key file missing or unreadable), which is exactly when its path matters. $null when unknown,
# e.g. under the FIPS policy, where .NET Framework refuses MD5.
function Get-CapiKeyFileName {
    param([string]$Container)
    if (-not $Container -or $Container -match '[^\x20-\x7E]') {
        return $null
    }
    try {
        $machineGuid = [string](Get-ItemProperty -LiteralPath 'HKLM:\SOFTWARE\Microsoft\Cryptography' -Name MachineGuid -ErrorAction Stop).MachineGuid
        $md5 = [System.Security.Cryptography.MD5]::Create()
        try {
            $digest = $md5.ComputeHash([System.Text.Encoding]::ASCII.GetBytes($Container.ToLowerInvariant() + [char]0))
        }
        finally {
            $md5.Dispose()
        }
    }
    catch {
        return $null
    }
    $name = ''
    for ($offset = 0; $offset -lt 16; $offset += 4) {
        # BitConverter reads in the machine's byte order, little-endian on every Windows platform.
        $name += [System.BitConverter]::ToUInt32($digest, $offset).ToString('x8')
    }
    return $name + '_' + $machineGuid
}

# Why a key could not be opened, in the protocol's words: NotFound for "Keyset does not exist" (NTE_BAD_KEYSET,
# NTE_NO_KEY), AccessDenied for NTE_PERM and E_ACCESSDENIED (the key exists; its ACL refuses the caller), else the
# general mapping. The providers open key files with the caller's token and without backup semantics, so from build
# 17763 an Administrator gets AccessDenied for the healthy RDP key.
function Get-KeyOpenError {
    param($ErrorRecord)
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        switch ($exception.HResult) {
            -2146893802 { return 'NotFound' }      # 0x80090016 NTE_BAD_KEYSET
            -2146893811 { return 'NotFound' }      # 0x8009000D NTE_NO_KEY
            -2146893808 { return 'AccessDenied' }  # 0x80090010 NTE_PERM
            -2147024891 { return 'AccessDenied' }  # 0x80070005 E_ACCESSDENIED
        }
        $exception = $exception.InnerException
    }
    return Get-AgentErrorType -ErrorRecord $ErrorRecord
}

# The file of a CNG machine key that cannot be opened (so its unique name is unknown): the one file of
# %ProgramData%\Microsoft\Crypto\Keys that holds the key's name in UTF-16 (CNG key files carry it; UNCONFIRMED by a
# Microsoft page), read with backup semantics. $null when none or more than one does.
function Find-CngKeyFileName {
    param([string]$Container)
    if (-not $Container) {
        return $null
    }
    $folder = [System.IO.Path]::Combine($env:ProgramData, 'Microsoft\Crypto\Keys')
    try {
        $files = @(Get-ChildItem -LiteralPath $folder -File -Force -ErrorAction Stop)
    }
    catch {
        return $null
    }
    $needle = $Container + [char]0
    $found = New-Object System.Collections.Generic.List[string]
    foreach ($file in $files) {
        try {
            $bytes = Read-FileBytes -Path $file.FullName
        }
        catch {
            continue
        }
        # Both byte alignments: the name need not start at an even offset.
        foreach ($offset in 0, 1) {
            if ($bytes.Length -le $offset) {
                continue
            }
            $text = [System.Text.Encoding]::Unicode.GetString($bytes, $offset, $bytes.Length - $offset)
            if ($text.IndexOf($needle, [System.StringComparison]::OrdinalIgnoreCase) -ge 0) {
                $found.Add([string]$file.Name)
                break
            }
        }
    }
    if ($found.Count -ne 1) {
        return $null
    }
    return $found[0]
}

# What the certificate's private key is and which container holds it. Kind, provider and container come from the
# certificate's key link (CERT_KEY_PROV_INFO_PROP_ID), which needs no access to the key; the unique name needs the
# key to be opened. When that fails (key file missing or unreadable: the faults being diagnosed) a CAPI key's file
# name is derived from its container name and a CNG key's file is looked for by the key's name; OpenError says why
# the key could not be opened.
function Resolve-CertificateKey {
    param($Certificate)
    $resolved = @{ Kind = 'unknown'; Provider = $null; ProviderType = $null; Container = $null; UniqueName = $null; OpenError = $null }
    $providerInfo = $null
    try {
        Initialize-NativeMethods
        $providerInfo = [Rdpfix.Agent.NativeMethods]::GetKeyProviderInfo($Certificate.Handle)
    }
    catch {
        $providerInfo = $null
    }
    if ($null -ne $providerInfo) {
        # dwProvType 0 marks a CNG key storage provider
        # (learn.microsoft.com/windows/win32/api/wincrypt/ns-wincrypt-crypt_key_prov_info).
        $resolved.Kind = if ($providerInfo.ProviderType -eq 0) { 'cng' } else { 'capi' }
        $resolved.Provider = $providerInfo.Provider
        $resolved.ProviderType = $providerInfo.ProviderType
        $resolved.Container = $providerInfo.Container
        try {
            if ($resolved.Kind -eq 'cng') {
                $provider = New-Object System.Security.Cryptography.CngProvider($providerInfo.Provider)
                $key = [System.Security.Cryptography.CngKey]::Open($providerInfo.Container, $provider, [System.Security.Cryptography.CngKeyOpenOptions]::MachineKey)
                try {
                    $resolved.UniqueName = $key.UniqueName
                }
                finally {
                    $key.Dispose()
                }
            }
            else {
                $resolved.UniqueName = Get-CapiUniqueName -Certificate $Certificate -ProviderInfo $providerInfo
            }
        }
        catch {
            $resolved.UniqueName = $null
            $resolved.OpenError = Get-KeyOpenError -ErrorRecord $_
        }
        if ($resolved.Kind -eq 'capi' -and -not $resolved.UniqueName) {
            $resolved.UniqueName = Get-CapiKeyFileName -Container $resolved.Container
        }
        if ($resolved.Kind -eq 'cng' -and -not $resolved.UniqueName -and $resolved.OpenError -ne 'NotFound') {
            # A CNG key that exists but cannot be opened must not look missing: find its file to read its ACL.
            $resolved.UniqueName = Find-CngKeyFileName -Container $resolved.Container
        }
        return $resolved
    }
    # The key link could not be read (the native helper is unavailable): ask the certificate's own key objects.
    try {
        $privateKey = $Certificate.PrivateKey
        if ($null -ne $privateKey -and $null -ne $privateKey.PSObject.Properties['CspKeyContainerInfo']) {
            $info = $privateKey.CspKeyContainerInfo
            $resolved.Kind = 'capi'
            $resolved.Provider = $info.ProviderName
            $resolved.ProviderType = $info.ProviderType
            $resolved.Container = $info.KeyContainerName
            $resolved.UniqueName = $info.UniqueKeyContainerName
            return $resolved
        }
    }
    catch {
        $null = $_
    }
    try {
        # pitfall-ok: newer-than-net452 a last fallback inside try/catch: on 4.5.2 the type is missing and the key stays unknown
        $rsa = [System.Security.Cryptography.X509Certificates.RSACertificateExtensions]::GetRSAPrivateKey($Certificate)
        if ($null -ne $rsa -and $null -ne $rsa.PSObject.Properties['Key']) {
            $resolved.Kind = 'cng'
            $resolved.Provider = $rsa.Key.Provider.Provider
            $resolved.Container = $rsa.Key.KeyName
            $resolved.UniqueName = $rsa.Key.UniqueName
        }
    }
    catch {
        $null = $_
    }
    return $resolved
}

# The key record of cert.list: what the certificate's key link says, and the key file's state. Any part that
# cannot be read is null; provider_kind is "unknown" when not even the key link could be read.
function Get-CertificateKeyRecord {
    param($Certificate)
    if (-not $Certificate.HasPrivateKey) {
        return $null
    }
    $resolved = Resolve-CertificateKey -Certificate $Certificate
    $record = [ordered]@{
        provider_kind = $resolved.Kind
        provider_name = $resolved.Provider
        container = $resolved.Container
        path = Get-KeyFilePath -Kind $resolved.Kind -Provider $resolved.Provider -ProviderType $resolved.ProviderType -UniqueName $resolved.UniqueName
        exists = $null
        size = $null
        owner = $null
        sddl = $null
        open_error = $resolved.OpenError
    }
    if (-not $record.path -and $resolved.OpenError -eq 'NotFound') {
        # The provider itself says the key does not exist.
        $record.exists = $false
    }
    if ($record.path) {
        $item = Get-ItemOrNull -Path $record.path
        $record.exists = $null -ne $item
        if ($null -ne $item) {
            $record.size = [long]$item.Length
            $security = Get-SecurityRecord -Path $record.path
            $record.owner = $security.owner
            $record.sddl = $security.sddl
        }
    }
    return $record
}

# --------------------------------------------------------------------------------------------------------------------
# Services and processes
# --------------------------------------------------------------------------------------------------------------------

function Get-ServiceNameArgument {
    param([string]$Name)
    # Get-Service treats these as wildcards, and the name goes into a WQL filter; the protocol names services exactly.
    if ($Name -match '[\*\?\[\]''"\\]' -or $Name.Length -eq 0) {
        throw (New-AgentException 'InvalidArgument' "service name '$Name' is not valid")
    }
    return $Name
}

function Get-ServiceStatusText {
    param([string]$Name)
    return [string](Get-Service -Name $Name -ErrorAction Stop).Status
}

# Win32_Service.StartMode in the protocol's words. ServiceController.StartType would be simpler, but it arrived with
# .NET Framework 4.6.1: on an un-updated 4.5.2 host it is empty and a disabled service would look startable.
$ServiceStartTypes = @{ Auto = 'Automatic'; Manual = 'Manual'; Disabled = 'Disabled'; Boot = 'Boot'; System = 'System' }

# Win32_Service of one service, or $null when there is none.
function Get-Win32Service {
    param([string]$Name)
    $found = @(Get-CimInstance -ClassName Win32_Service -Filter "Name='$Name'" -ErrorAction Stop)
    if ($found.Count -eq 0) {
        return $null
    }
    return $found[0]
}

function Get-ServiceStartType {
    param($Service)
    $mode = [string]$Service.StartMode
    if (-not $ServiceStartTypes.ContainsKey($mode)) {
        throw (New-AgentException 'Failed' "service '$($Service.Name)' reports the start mode '$mode'")
    }
    return $ServiceStartTypes[$mode]
}

# Every wait for a service is bounded: Restart-Service and Start-Service wait for ever, so a service hanging in
# StopPending would hold the whole WinRM command and no result would come back. A wait that runs out is a Timeout.
$ServiceWaitSeconds = 60

function Wait-ServiceStatus {
    param($Controller, [string]$Status)
    try {
        $Controller.WaitForStatus($Status, [TimeSpan]::FromSeconds($ServiceWaitSeconds))
    }
    catch {
        $exception = $_.Exception
        while ($null -ne $exception -and -not ($exception -is [System.ServiceProcess.TimeoutException])) {
            $exception = $exception.InnerException
        }
        if ($null -eq $exception) {
            throw
        }
        $Controller.Refresh()
        throw (New-AgentException 'Timeout' "service '$($Controller.ServiceName)' did not reach $Status within $ServiceWaitSeconds seconds; it is $($Controller.Status)")
    }
}

function Stop-ServiceBounded {
    param($Controller)
    $Controller.Refresh()
    if ([string]$Controller.Status -eq 'Stopped') {
        return
    }
    if ([string]$Controller.Status -ne 'StopPending') {
        $Controller.Stop()
    }
    Wait-ServiceStatus -Controller $Controller -Status 'Stopped'
}

function Start-ServiceBounded {
    param($Controller)
    $Controller.Refresh()
    if ([string]$Controller.Status -eq 'Running') {
        return
    }
    if ([string]$Controller.Status -ne 'StartPending') {
        $Controller.Start()
    }
    Wait-ServiceStatus -Controller $Controller -Status 'Running'
}

# Runs a program with arguments that contain no quotes, capturing both streams without PowerShell turning stderr
# lines into errors (Windows PowerShell 5.1 does that for native commands under ErrorActionPreference Stop).
function Invoke-NativeProgram {
    param([string]$FilePath, [string[]]$ArgumentList)
    $startInfo = New-Object System.Diagnostics.ProcessStartInfo
    $startInfo.FileName = $FilePath
    $startInfo.Arguments = (@($ArgumentList | ForEach-Object { '"' + $_ + '"' })) -join ' '
    $startInfo.UseShellExecute = $false
    $startInfo.CreateNoWindow = $true
    $startInfo.RedirectStandardInput = $true
    $startInfo.RedirectStandardOutput = $true
    $startInfo.RedirectStandardError = $true
    $process = [System.Diagnostics.Process]::Start($startInfo)
    try {
        $process.StandardInput.Close()
        $stderrTask = $process.StandardError.ReadToEndAsync()
        $stdout = $process.StandardOutput.ReadToEnd()
        $process.WaitForExit()
        return @{ ExitCode = $process.ExitCode; StdOut = $stdout; StdErr = $stderrTask.Result }
    }
    finally {
        $process.Dispose()
    }
}

# --------------------------------------------------------------------------------------------------------------------
# WMI: the RDP listener (Win32_TSGeneralSetting, learn.microsoft.com/windows/win32/termserv/win32-tsgeneralsetting)
# --------------------------------------------------------------------------------------------------------------------

$TerminalServicesNamespace = 'root\cimv2\TerminalServices'

function Get-TerminalNameArgument {
    param([hashtable]$Table)
    $name = Get-StringArgument -Table $Table -Name 'terminal_name' -Default 'RDP-tcp'
    # The name goes into a WQL filter.
    if ($name -notmatch '^[A-Za-z0-9#_.-]+$') {
        throw (New-AgentException 'InvalidArgument' "terminal name '$name' is not valid")
    }
    return $name
}

function Get-ListenerSetting {
    param([string]$TerminalName)
    # WQL compares strings case-insensitively, so 'RDP-tcp' finds the listener Windows names 'RDP-Tcp'.
    $setting = Get-CimInstance -Namespace $TerminalServicesNamespace -ClassName Win32_TSGeneralSetting -Filter "TerminalName='$TerminalName'" -ErrorAction Stop
    $setting = @($setting)
    if ($setting.Count -eq 0) {
        throw (New-AgentException 'NotFound' "no RDP listener named '$TerminalName'")
    }
    return $setting[0]
}

function Get-ThumbprintOrNull {
    param($Value)
    if ([string]::IsNullOrEmpty([string]$Value)) {
        return $null
    }
    return ([string]$Value).ToUpperInvariant()
}

# --------------------------------------------------------------------------------------------------------------------
# The operations. One entry per operation of docs/agent-protocol.md; each receives its arguments as a hashtable and
# returns the operation's data as one dictionary.
# --------------------------------------------------------------------------------------------------------------------

# What runs the agent: PowerShell and .NET versions, language mode, the installed UI language (for bug reports; the
# .NET Framework Release number: learn.microsoft.com/dotnet/framework/install/how-to-determine-which-versions-are-installed).
function Get-RuntimeRecord {
    $release = $null
    try {
        $ndp = Get-ItemProperty -LiteralPath 'HKLM:\SOFTWARE\Microsoft\NET Framework Setup\NDP\v4\Full' -Name Release -ErrorAction Stop
        $release = [int]$ndp.Release
    }
    catch {
        # Not installed (PowerShell 7 on a host without .NET Framework 4.5+) or not readable: reported as unknown.
        $release = $null
    }
    return [ordered]@{
        powershell_version = [string]$PSVersionTable.PSVersion
        powershell_edition = if ($PSVersionTable.PSEdition) { [string]$PSVersionTable.PSEdition } else { 'Desktop' }
        clr_version = [string]$PSVersionTable.CLRVersion
        dotnet_framework_release = $release
        language_mode = [string]$ExecutionContext.SessionState.LanguageMode
        ui_culture = [string][System.Globalization.CultureInfo]::InstalledUICulture.Name
    }
}

# Firewall rules with their filters, as plain records, read per policy store: the local store (PersistentStore, where
# Set-/Remove-/New-NetFirewallRule write by default) and the Group Policy store (RSOP: every GPO applied to the host,
# read-only). Filters are read in bulk per store and joined by InstanceID within that store only: asking for each
# rule's filters separately costs a CIM round trip per rule, and a GPO rule and a local rule may share an ID.
# A read that fails is an error: an empty list would say "no rules".
$FirewallRuleStores = @('PersistentStore', 'RSOP')

function Get-FirewallStoreRules {
    param([string]$Store, [string]$Name)
    $ruleParameters = @{ PolicyStore = $Store; ErrorAction = 'Stop' }
    if ($Name) { $ruleParameters.Name = $Name }
    try {
        return @(Get-NetFirewallRule @ruleParameters)
    }
    catch {
        # Asked by Name, "no rule has it" is an answer; every other failure is one.
        if ($Name -and [string]$_.CategoryInfo.Category -eq 'ObjectNotFound') {
            return @()
        }
        throw
    }
}

function Get-NetworkCategories {
    try {
        return @(Get-NetConnectionProfile -ErrorAction Stop | ForEach-Object { [string]$_.NetworkCategory })
    }
    catch {
        # No connected network is an answer (no category), not a failure.
        if ([string]$_.CategoryInfo.Category -eq 'ObjectNotFound') {
            return @()
        }
        throw
    }
}

function Get-FirewallRuleRecords {
    param([string]$Name, [string[]]$Stores = $FirewallRuleStores)
    foreach ($store in $Stores) {
        $rules = @(Get-FirewallStoreRules -Store $store -Name $Name)
        if ($rules.Count -eq 0) {
            continue
        }
        $byId = {
            param($Filters)
            $table = @{}
            foreach ($filter in $Filters) { $table[[string]$filter.InstanceID] = $filter }
            $table
        }
        if ($Name) {
            $ports = & $byId @($rules | Get-NetFirewallPortFilter -ErrorAction Stop)
            $addresses = & $byId @($rules | Get-NetFirewallAddressFilter -ErrorAction Stop)
            $applications = & $byId @($rules | Get-NetFirewallApplicationFilter -ErrorAction Stop)
            $services = & $byId @($rules | Get-NetFirewallServiceFilter -ErrorAction Stop)
        }
        else {
            $ports = & $byId @(Get-NetFirewallPortFilter -All -PolicyStore $store -ErrorAction Stop)
            $addresses = & $byId @(Get-NetFirewallAddressFilter -All -PolicyStore $store -ErrorAction Stop)
            $applications = & $byId @(Get-NetFirewallApplicationFilter -All -PolicyStore $store -ErrorAction Stop)
            $services = & $byId @(Get-NetFirewallServiceFilter -All -PolicyStore $store -ErrorAction Stop)
        }
        foreach ($rule in $rules) {
            $id = [string]$rule.InstanceID
            $port = $ports[$id]
            $address = $addresses[$id]
            $application = $applications[$id]
            $service = $services[$id]
            # Lists are built inside @(...): a statement's output is unrolled, so one port would become a string.
            [ordered]@{
                name = [string]$rule.Name
                display_name = [string]$rule.DisplayName
                group = [string]$rule.Group
                direction = [string]$rule.Direction
                action = [string]$rule.Action
                enabled = ([string]$rule.Enabled -eq 'True')
                profiles = [int]$rule.Profile
                protocol = if ($port) { [string]$port.Protocol } else { 'Any' }
                local_ports = @(if ($port) { $port.LocalPort | ForEach-Object { [string]$_ } } else { 'Any' })
                remote_ports = @(if ($port) { $port.RemotePort | ForEach-Object { [string]$_ } } else { 'Any' })
                remote_addresses = @(if ($address) { $address.RemoteAddress | ForEach-Object { [string]$_ } } else { 'Any' })
                program = if ($application) { [string]$application.Program } else { 'Any' }
                service = if ($service) { [string]$service.Service } else { 'Any' }
                policy_store_source_type = [string]$rule.PolicyStoreSourceType
            }
        }
    }
}

# Who the agent runs as, after it enabled its privileges: the identity (SYSTEM or a user), whether the token is an
# elevated Administrator's, its group SIDs (names are localised: information only) and every privilege it holds.
function Get-CallerRecord {
    Initialize-AgentToken
    $identity = [System.Security.Principal.WindowsIdentity]::GetCurrent()
    $principal = New-Object System.Security.Principal.WindowsPrincipal($identity)
    $groups = New-Object System.Collections.Generic.List[object]
    foreach ($group in $identity.Groups) {
        $sid = [string]$group.Value
        $groups.Add([ordered]@{ sid = $sid; name = Get-AccountName -Sid $sid })
    }
    $privileges = [ordered]@{}
    foreach ($privilege in [Rdpfix.Agent.Token]::Privileges()) {
        $privileges[[string]$privilege.Name] = [bool]$privilege.Enabled
    }
    return [ordered]@{
        user = [string]$identity.Name
        sid = [string]$identity.User.Value
        system = [bool]$identity.IsSystem
        administrator = [bool]$principal.IsInRole([System.Security.Principal.WindowsBuiltInRole]::Administrator)
        groups = $groups.ToArray()
        privileges = $privileges
        agent_enabled = [string[]]$AgentToken.Enabled
    }
}

# --------------------------------------------------------------------------------------------------------------------
# Guards (docs/agent-protocol.md, "Guards"): what a read answers now, compared with what the plan relied on. The rules
# are the lab's (rdplab.ops.guard) rule for rule, first difference included. Both sides are compared as the controller
# sees them: the read's data goes through JSON first, as the expectation did when the batch was read, so a hashtable
# and a PSCustomObject are both objects, [int], [long] and [decimal] are numbers, and an array stays an array.
# - null, true/false, numbers (by value: 1 equals 1.0; true is not 1), strings (ordinal, case-sensitive: the
#   controller builds expectations from what the agent reported) must be the same kind and value;
# - lists: same length, then element by element in order, with the same match (a one-element list never equals its
#   element: that is an unrolled array);
# - objects: every member of the expectation present (member names case-sensitive) with a matching value; with match
#   'equal' the actual object has no other member.
# --------------------------------------------------------------------------------------------------------------------

# The operations a guard may read with: every read operation but the guard itself.
$GuardReadOperations = @(
    'system.info', 'registry.get', 'listener.get', 'cert.list', 'service.get', 'session.list', 'file.stat',
    'file.read', 'dir.list', 'dir.read_each', 'util.sleep', 'dir.stat', 'events.query', 'firewall.rules.list',
    'security_products.list', 'tls.cipher_suites.list'
)
$GuardStringShown = 80

function Get-GuardKind {
    param($Value)
    if ($null -eq $Value) { return 'null' }
    if ($Value -is [bool]) { return 'boolean' }
    # PowerShell 7's ConvertFrom-Json reads ISO 8601 strings as dates; they are strings of the protocol.
    if ($Value -is [string] -or $Value -is [char] -or $Value -is [datetime]) { return 'string' }
    if ($Value -is [int] -or $Value -is [long] -or $Value -is [decimal] -or $Value -is [double] -or
        $Value -is [single] -or $Value -is [uint32] -or $Value -is [uint64] -or $Value -is [int16] -or
        $Value -is [uint16] -or $Value -is [byte] -or $Value -is [sbyte] -or
        $Value.GetType().FullName -eq 'System.Numerics.BigInteger') {
        return 'number'
    }
    if ($Value -is [System.Collections.IDictionary] -or $Value -is [System.Management.Automation.PSCustomObject]) {
        return 'object'
    }
    if ($Value -is [System.Collections.IList]) { return 'list' }
    return 'unknown'
}

function ConvertTo-GuardString {
    param($Value)
    if ($Value -is [datetime]) {
        return ConvertTo-IsoUtc -Date $Value
    }
    return [string]$Value
}

function Test-GuardNumberEqual {
    param($Left, $Right)
    try {
        return ([decimal]$Left) -eq ([decimal]$Right)
    }
    catch {
        return ([double]$Left) -eq ([double]$Right)
    }
}

function Format-GuardItems {
    param([int]$Count)
    if ($Count -eq 1) { return 'a list of 1 item' }
    return 'a list of ' + $Count + ' items'
}

# A value as a difference names it: scalars as JSON (long strings cut), lists by length, objects by kind.
function Format-GuardValue {
    param($Value)
    $kind = Get-GuardKind -Value $Value
    if ($kind -eq 'null') { return 'null' }
    if ($kind -eq 'boolean') { if ($Value) { return 'true' } else { return 'false' } }
    if ($kind -eq 'number') { return [string]::Format([System.Globalization.CultureInfo]::InvariantCulture, '{0}', $Value) }
    if ($kind -eq 'string') {
        $text = ConvertTo-GuardString -Value $Value
        if ($text.Length -gt $GuardStringShown) {
            $text = $text.Substring(0, $GuardStringShown) + '...'
        }
        return '"' + $text + '"'
    }
    if ($kind -eq 'list') { return Format-GuardItems -Count $Value.Count }
    if ($kind -eq 'object') { return 'an object' }
    return 'a ' + $Value.GetType().FullName
}

# The member names of an object, in order.
function Get-GuardMemberNames {
    param($Value)
    $names = New-Object System.Collections.Generic.List[string]
    if ($Value -is [System.Collections.IDictionary]) {
        foreach ($key in $Value.Keys) {
            $names.Add([string]$key)
        }
    }
    else {
        foreach ($property in $Value.PSObject.Properties) {
            $names.Add([string]$property.Name)
        }
    }
    return , $names.ToArray()
}

# One member of an object by its exact (case-sensitive) name: @{ Found; Value } (a hashtable, so a list value is
# never unrolled on the way out).
function Get-GuardMember {
    param($Value, [string]$Name)
    if ($Value -is [System.Collections.IDictionary]) {
        foreach ($key in $Value.Keys) {
            if ([string]::Equals([string]$key, $Name, [System.StringComparison]::Ordinal)) {
                return @{ Found = $true; Value = $Value[$key] }
            }
        }
        return @{ Found = $false; Value = $null }
    }
    foreach ($property in $Value.PSObject.Properties) {
        if ([string]::Equals([string]$property.Name, $Name, [System.StringComparison]::Ordinal)) {
            return @{ Found = $true; Value = $property.Value }
        }
    }
    return @{ Found = $false; Value = $null }
}

function Join-GuardPath {
    param([string]$Path, [string]$Name)
    if ($Path.Length -eq 0) { return $Name }
    return $Path + '.' + $Name
}

# The first place Actual differs from Expected, as "where: expected X, found Y"; $null when they match.
function Compare-GuardValue {
    param($Expected, $Actual, [string]$Match, [string]$Path)
    $where = if ($Path.Length -eq 0) { 'value' } else { $Path }
    $expectedKind = Get-GuardKind -Value $Expected
    $actualKind = Get-GuardKind -Value $Actual
    if ($expectedKind -eq 'unknown') {
        throw (New-AgentException 'InvalidArgument' "${where}: a guard cannot compare $(Format-GuardValue -Value $Expected)")
    }
    if ($expectedKind -ne $actualKind) {
        return "${where}: expected $(Format-GuardValue -Value $Expected), found $(Format-GuardValue -Value $Actual)"
    }
    if ($expectedKind -eq 'list') {
        if ($Expected.Count -ne $Actual.Count) {
            return "${where}: expected $(Format-GuardItems -Count $Expected.Count), found $(Format-GuardItems -Count $Actual.Count)"
        }
        for ($index = 0; $index -lt $Expected.Count; $index++) {
            $left = $Expected[$index]
            $right = $Actual[$index]
            $difference = Compare-GuardValue -Expected $left -Actual $right -Match $Match -Path ($where + '[' + $index + ']')
            if ($null -ne $difference) {
                return $difference
            }
        }
        return $null
    }
    if ($expectedKind -eq 'object') {
        foreach ($name in (Get-GuardMemberNames -Value $Expected)) {
            $left = (Get-GuardMember -Value $Expected -Name $name).Value
            $member = Get-GuardMember -Value $Actual -Name $name
            $child = Join-GuardPath -Path $Path -Name $name
            if (-not $member.Found) {
                return "${child}: expected $(Format-GuardValue -Value $left), found nothing"
            }
            $right = $member.Value
            $difference = Compare-GuardValue -Expected $left -Actual $right -Match $Match -Path $child
            if ($null -ne $difference) {
                return $difference
            }
        }
        if ($Match -eq 'equal') {
            foreach ($name in (Get-GuardMemberNames -Value $Actual)) {
                if (-not (Get-GuardMember -Value $Expected -Name $name).Found) {
                    $right = (Get-GuardMember -Value $Actual -Name $name).Value
                    return "$(Join-GuardPath -Path $Path -Name $name): expected nothing, found $(Format-GuardValue -Value $right)"
                }
            }
        }
        return $null
    }
    $same = $false
    if ($expectedKind -eq 'null') {
        $same = $true
    }
    elseif ($expectedKind -eq 'boolean') {
        $same = ([bool]$Expected -eq [bool]$Actual)
    }
    elseif ($expectedKind -eq 'number') {
        $same = Test-GuardNumberEqual -Left $Expected -Right $Actual
    }
    else {
        $same = [string]::Equals((ConvertTo-GuardString -Value $Expected), (ConvertTo-GuardString -Value $Actual), [System.StringComparison]::Ordinal)
    }
    if ($same) {
        return $null
    }
    return "${where}: expected $(Format-GuardValue -Value $Expected), found $(Format-GuardValue -Value $Actual)"
}

# The guard's 'pick' steps, checked: a member name, or an object with one member 'where' (a non-empty object).
function Get-GuardSteps {
    param([hashtable]$Table)
    $steps = Get-OpArgument -Table $Table -Name 'pick' -Default @()
    if (-not ($steps -is [System.Collections.IList])) {
        throw (New-AgentException 'InvalidArgument' "argument 'pick' must be a list of steps")
    }
    foreach ($step in $steps) {
        if ($step -is [string] -and $step.Length -gt 0) {
            continue
        }
        $valid = $false
        if ((Get-GuardKind -Value $step) -eq 'object') {
            $names = Get-GuardMemberNames -Value $step
            $where = (Get-GuardMember -Value $step -Name 'where').Value
            if ($names.Count -eq 1 -and $names[0] -ceq 'where' -and (Get-GuardKind -Value $where) -eq 'object') {
                $fields = Get-GuardMemberNames -Value $where
                $valid = $fields.Count -gt 0
                foreach ($field in $fields) {
                    if ($field.Length -eq 0) { $valid = $false }
                }
            }
        }
        if (-not $valid) {
            throw (New-AgentException 'InvalidArgument' "a 'pick' step is a member name or {""where"": {field: value}}")
        }
    }
    return , $steps
}

# The name a difference gives the picked value: certificates[thumbprint="AB..."].key
function Get-GuardPickName {
    param($Steps)
    $name = ''
    foreach ($step in $Steps) {
        if ($step -is [string]) {
            if ($name.Length -gt 0) { $name += '.' }
            $name += $step
            continue
        }
        $where = (Get-GuardMember -Value $step -Name 'where').Value
        $parts = New-Object System.Collections.Generic.List[string]
        foreach ($field in (Get-GuardMemberNames -Value $where)) {
            $parts.Add($field + '=' + (Format-GuardValue -Value (Get-GuardMember -Value $where -Name $field).Value))
        }
        $name += '[' + ($parts.ToArray() -join ',') + ']'
    }
    return $name
}

# Follows the 'pick' steps: a member name takes that member of an object ($null when absent or not an object); a
# where step keeps the elements of a list whose fields equal its values ($null when not a list). @{ Value }.
function Select-GuardValue {
    param($Data, $Steps)
    $current = $Data
    foreach ($step in $Steps) {
        if ($step -is [string]) {
            if ((Get-GuardKind -Value $current) -eq 'object') {
                $current = (Get-GuardMember -Value $current -Name $step).Value
            }
            else {
                $current = $null
            }
            continue
        }
        if ((Get-GuardKind -Value $current) -ne 'list') {
            $current = $null
            continue
        }
        $where = (Get-GuardMember -Value $step -Name 'where').Value
        $kept = New-Object System.Collections.Generic.List[object]
        foreach ($element in $current) {
            if ((Get-GuardKind -Value $element) -ne 'object') {
                continue
            }
            $keep = $true
            foreach ($field in (Get-GuardMemberNames -Value $where)) {
                $member = Get-GuardMember -Value $element -Name $field
                $wanted = (Get-GuardMember -Value $where -Name $field).Value
                if (-not $member.Found -or $null -ne (Compare-GuardValue -Expected $wanted -Actual $member.Value -Match 'equal' -Path '')) {
                    $keep = $false
                    break
                }
            }
            if ($keep) {
                $kept.Add($element)
            }
        }
        $current = $kept.ToArray()
    }
    return @{ Value = $current }
}

# --------------------------------------------------------------------------------------------------------------------
# The run lock (docs/agent-protocol.md, "The run lock"): one file whose JSON record names the run holding the host:
# {token, owner, acquired, expires, process: {id, started}, held}. The batch that takes it keeps the file open for its
# whole life (read and write, sharing only read and delete), so the lock is alive exactly as long as that batch runs:
# a batch that ends - released, stopped half-way by a terminate, or its process killed - closes the handle, and the
# next run that can open the file for writing knows nobody holds it (`held` records). The process a record names
# (under psrp the WinRM host process, alive for the whole connection) and the record's time only decide for a record
# without `held` (an older version's); its `expires` never counts beyond the file's last write time plus the longest
# time to live. lock.acquire creates the file with FileMode.CreateNew (one run wins), owned by Administrators with a
# protected SYSTEM/Administrators DACL, in a folder with the same protected DACL (a standard user cannot plant a lock
# there); a lock file owned by anyone else is not a record to trust and is taken over when nobody holds it open.
# lock.release deletes the file only when the record is the caller's. The policy (time to live, how long to wait, who
# may hold it) is the controller's.
# --------------------------------------------------------------------------------------------------------------------

$LockMaxTtlSeconds = 86400
$LockMaxWaitMilliseconds = 60000
$HResultSharingViolation = -2147024864  # 0x80070020 ERROR_SHARING_VIOLATION
# lock.release: how often it tries again when the file is held open by another agent for a moment, and how long it
# waits between two tries.
$LockReleaseAttempts = 10
$LockReleasePauseMilliseconds = 200
# Who may own the lock's folder and file, and hold rights to create or change files in that folder: SYSTEM and
# Administrators. CREATOR OWNER and CREATOR GROUP stand for whoever creates a file (who must be allowed to first).
$LockTrustedSids = @('S-1-5-18', 'S-1-5-32-544')
$LockCreatorSids = @('S-1-3-0', 'S-1-3-1')
# The lock folder's and the lock file's security: owned by Administrators, a protected DACL for SYSTEM and
# Administrators only (the backup folders' SDDL).
$LockFolderSddl = 'O:BAG:SYD:PAI(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)'
$LockFileSddl = 'O:BAG:SYD:PAI(A;;FA;;;SY)(A;;FA;;;BA)'
# Rights that let a principal put a file into a folder or change one (or the folder's security): add file 0x2, add
# subfolder 0x4, delete child 0x40, delete 0x10000, write DAC 0x40000, write owner 0x80000, generic all and write.
$LockOpenRights = 0x2 -bor 0x4 -bor 0x40 -bor 0x10000 -bor 0x40000 -bor 0x80000 -bor 0x10000000 -bor 0x40000000
# The lock files this batch holds open (full path -> FileStream), closed when the batch ends, however it ends.
$LockHandles = @{}

function Get-LockPath {
    param([hashtable]$Table)
    $path = Get-StringArgument -Table $Table -Name 'path'
    if ($path.Length -eq 0) {
        return [System.IO.Path]::Combine([string]$env:ProgramData, 'rdpfix', 'run.lock')
    }
    return $path
}

function Get-BoundedIntegerArgument {
    param([hashtable]$Table, [string]$Name, [int]$Minimum, [int]$Maximum, $Default = $null)
    $value = Get-OpArgument -Table $Table -Name $Name -Default $Default -Required:($null -eq $Default)
    $kind = Get-GuardKind -Value $value
    if ($kind -ne 'number' -or [decimal]$value -ne [math]::Truncate([decimal]$value) -or [decimal]$value -lt $Minimum -or [decimal]$value -gt $Maximum) {
        throw (New-AgentException 'InvalidArgument' "argument '$Name' must be an integer from $Minimum to $Maximum")
    }
    return [int]$value
}

function ConvertFrom-IsoUtc {
    param([string]$Text)
    $styles = [System.Globalization.DateTimeStyles]::AssumeUniversal -bor [System.Globalization.DateTimeStyles]::AdjustToUniversal
    return [datetime]::ParseExact($Text, "yyyy-MM-dd'T'HH:mm:ss'Z'", [System.Globalization.CultureInfo]::InvariantCulture, $styles)
}

# This agent process, as a lock record names it: its id and start time (a reused id has another start time).
function Get-AgentProcessRecord {
    $process = [System.Diagnostics.Process]::GetCurrentProcess()
    return [ordered]@{ id = [int]$process.Id; started = ConvertTo-IsoUtc -Date $process.StartTime }
}

# Whether the agent process a record names still runs. A process whose start time may not be read counts as running.
function Test-LockProcessAlive {
    param($Record)
    if ($null -eq $Record.process) {
        return $true
    }
    try {
        $process = [System.Diagnostics.Process]::GetProcessById([int]$Record.process.id)
    }
    catch [System.ArgumentException] {
        return $false
    }
    try {
        return (ConvertTo-IsoUtc -Date $process.StartTime) -ceq (ConvertTo-GuardString -Value $Record.process.started)
    }
    catch {
        return $true
    }
}

# Owner (a SID) and DACL of the lock's folder or file, read with backup semantics (a planted file's DACL may leave
# Administrators out).
function Read-LockSecurity {
    param([string]$Path)
    Initialize-AgentToken
    $parts = [Rdpfix.Agent.BackupFile]::ReadSecurity($Path)
    $sddl = [string]$parts[1]
    return @{ Owner = [string]$parts[0]; Sddl = $sddl; Descriptor = New-Object System.Security.AccessControl.RawSecurityDescriptor($sddl) }
}

# The SIDs besides SYSTEM and Administrators that may create or change files in a folder: a non-trusted owner (who
# may rewrite the DACL), and every allow entry with one of $LockOpenRights (S-1-1-0, Everyone, for a missing DACL).
function Get-LockOpenPrincipals {
    param($Descriptor)
    $open = New-Object System.Collections.Generic.List[string]
    $owner = if ($null -ne $Descriptor.Owner) { $Descriptor.Owner.Value } else { '' }
    if ($LockTrustedSids -notcontains $owner) {
        $open.Add($owner)
    }
    if ($null -eq $Descriptor.DiscretionaryAcl) {
        $open.Add('S-1-1-0')
        return , $open.ToArray()
    }
    foreach ($ace in $Descriptor.DiscretionaryAcl) {
        if (-not ($ace -is [System.Security.AccessControl.CommonAce]) -or $ace.AceQualifier -ne [System.Security.AccessControl.AceQualifier]::AccessAllowed) {
            continue
        }
        $sid = $ace.SecurityIdentifier.Value
        if ($LockTrustedSids -contains $sid -or $LockCreatorSids -contains $sid -or $open.Contains($sid)) {
            continue
        }
        if (($ace.AccessMask -band $LockOpenRights) -ne 0) {
            $open.Add($sid)
        }
    }
    return , $open.ToArray()
}

# The lock's folder: created with the protected SYSTEM/Administrators DACL. An existing one whose owner or DACL lets
# anyone else create or change files in it (a folder an older version created with ProgramData's inherited ACL, where
# Users may create files) is reported, and given the protected DACL when the caller asks ($Secure: the controller
# does for rdpfix's own folder, %ProgramData%\rdpfix - a tightening, never a widening).
function Initialize-LockFolder {
    param([string]$Folder, [bool]$Secure)
    $report = [ordered]@{ path = $Folder; created = $false; open_to = @(); corrected = $false; previous_sddl = $null }
    $security = ConvertTo-DirectorySecurity -Sddl $LockFolderSddl
    if (-not [System.IO.Directory]::Exists($Folder)) {
        $created = [System.IO.Directory]::CreateDirectory($Folder)
        try {
            Initialize-AgentToken
            Invoke-SecurityWrite -Action { Set-DirectorySecurity -Directory $created -Security $security }
        }
        catch {
            # A folder meant to be locked down must not stay behind with the inherited (wider) ACL.
            try {
                [System.IO.Directory]::Delete($created.FullName, $false)
            }
            catch {
                $null = $_
            }
            throw
        }
        $report['created'] = $true
        return $report
    }
    $found = Read-LockSecurity -Path $Folder
    $open = Get-LockOpenPrincipals -Descriptor $found.Descriptor
    if ($open.Count -eq 0) {
        return $report
    }
    $report['open_to'] = $open
    $report['previous_sddl'] = $found.Sddl
    if ($Secure) {
        Initialize-AgentToken
        $directory = New-Object System.IO.DirectoryInfo($Folder)
        Invoke-SecurityWrite -Action { Set-DirectorySecurity -Directory $directory -Security $security }
        $report['corrected'] = $true
    }
    return $report
}

# The lock file this agent wrote: owned by Administrators, the protected SYSTEM/Administrators DACL.
function Set-LockFileSecurity {
    param([string]$Path)
    $security = New-Object System.Security.AccessControl.FileSecurity
    $sections = [System.Security.AccessControl.AccessControlSections]'Owner, Group, Access'
    $security.SetSecurityDescriptorSddlForm($LockFileSddl, $sections)
    $item = New-Object System.IO.FileInfo($Path)
    Initialize-AgentToken
    Invoke-SecurityWrite -Action {
        # FileInfo.SetAccessControl on .NET Framework; FileSystemAclExtensions on .NET (PowerShell 7).
        if ($null -ne $item.PSObject.Methods['SetAccessControl']) {
            $item.SetAccessControl($security)
        }
        else {
            # pitfall-ok: newer-than-net452 reached only where FileInfo has no SetAccessControl (.NET, PowerShell 7)
            [System.IO.FileSystemAclExtensions]::SetAccessControl($item, $security)
        }
    }
}

# A lock file's record. A file that is not a record (damaged, or not rdpfix's) is held by nobody known until its last
# write time plus the caller's time to live. No record's expiry counts beyond its last write time (never later than
# now) plus the longest time to live: a far-future `expires` holds nothing.
function Read-LockRecord {
    param([byte[]]$Bytes, [string]$Path, [int]$TtlSeconds)
    $record = $null
    try {
        $record = ConvertFrom-Json -InputObject ([System.Text.Encoding]::UTF8.GetString($Bytes))
    }
    catch {
        $record = $null
    }
    $written = [System.IO.File]::GetLastWriteTimeUtc($Path)
    $now = [datetime]::UtcNow
    if ($written -gt $now) {
        $written = $now
    }
    $latest = $written.AddSeconds($LockMaxTtlSeconds)
    if ($null -ne $record -and $record.token -is [string] -and $null -ne $record.expires) {
        try {
            $expires = ConvertFrom-IsoUtc -Text (ConvertTo-GuardString -Value $record.expires)
            if ($expires -gt $latest) {
                $expires = $latest
            }
            return @{
                Expires = $expires
                Record = [ordered]@{
                    token = [string]$record.token
                    owner = $record.owner
                    acquired = ConvertTo-GuardString -Value $record.acquired
                    expires = ConvertTo-IsoUtc -Date $expires
                    process = $record.process
                    held = ($record.held -eq $true)
                }
            }
        }
        catch {
            $record = $null
        }
    }
    $expires = $written.AddSeconds($TtlSeconds)
    return @{
        Expires = $expires
        Record = [ordered]@{ token = $null; owner = $null; acquired = ConvertTo-IsoUtc -Date $written; expires = ConvertTo-IsoUtc -Date $expires; process = $null; held = $false }
    }
}

function Test-LockBusyError {
    param($ErrorRecord)
    $exception = $ErrorRecord.Exception
    while ($null -ne $exception) {
        # Another agent holds the file open (sharing violation), or it is being deleted (access denied meanwhile).
        if ($exception.HResult -eq $HResultSharingViolation -or $exception -is [System.UnauthorizedAccessException] -or
            $exception -is [System.IO.FileNotFoundException]) {
            return $true
        }
        $exception = $exception.InnerException
    }
    return $false
}

# The handle a lock is held with: read and write, sharing read (others may read the record) and delete (so that the
# holder's release can delete the file before it closes the handle), never write - while it is open, nobody else can
# open the file to take the lock.
function Open-LockStream {
    param([string]$Path, [System.IO.FileMode]$Mode)
    # pitfall-ok: file-io-without-backup-semantics the lock file is the agent's own (protected SYSTEM/Administrators DACL)
    return New-Object System.IO.FileStream($Path, $Mode, [System.IO.FileAccess]::ReadWrite, ([System.IO.FileShare]::Read -bor [System.IO.FileShare]::Delete))
}

function Read-LockStream {
    param($Stream)
    $null = $Stream.Seek(0, [System.IO.SeekOrigin]::Begin)
    $buffer = New-Object System.IO.MemoryStream
    $Stream.CopyTo($buffer)
    return , $buffer.ToArray()
}

# The record of a lock file another agent holds open, for the message (shared read); $null when it cannot be read.
function Read-LockHolder {
    param([string]$Path, [int]$TtlSeconds)
    try {
        # pitfall-ok: file-io-without-backup-semantics the lock file is the agent's own (protected SYSTEM/Administrators DACL)
        $reader = New-Object System.IO.FileStream($Path, [System.IO.FileMode]::Open, [System.IO.FileAccess]::Read, ([System.IO.FileShare]::ReadWrite -bor [System.IO.FileShare]::Delete))
    }
    catch {
        return $null
    }
    try {
        return (Read-LockRecord -Bytes (Read-LockStream -Stream $reader) -Path $Path -TtlSeconds $TtlSeconds).Record
    }
    finally {
        $reader.Dispose()
    }
}

function Write-LockRecord {
    param($Stream, $Record)
    $bytes = [System.Text.Encoding]::UTF8.GetBytes((ConvertTo-Json -InputObject $Record -Depth $DataJsonDepth -Compress))
    $null = $Stream.Seek(0, [System.IO.SeekOrigin]::Begin)
    $Stream.SetLength(0)
    $Stream.Write($bytes, 0, $bytes.Length)
    $Stream.Flush($true)
}

# Closes the lock files this batch holds (the end of the batch: its locks are no longer alive).
function Close-LockHandles {
    foreach ($stream in @($LockHandles.Values)) {
        try {
            $stream.Dispose()
        }
        catch {
            $null = $_
        }
    }
    $LockHandles.Clear()
}

# One attempt: @{ Acquired; Record; Previous; Holder } or $null when the file was busy (try again).
function Invoke-LockAttempt {
    param([string]$Path, [string]$Token, $Owner, [int]$TtlSeconds, $Process)
    $now = [datetime]::UtcNow
    $record = [ordered]@{
        token = $Token
        owner = $Owner
        acquired = ConvertTo-IsoUtc -Date $now
        expires = ConvertTo-IsoUtc -Date ($now.AddSeconds($TtlSeconds))
        process = $Process
        held = $true
    }
    $key = [System.IO.Path]::GetFullPath($Path)
    $stream = $LockHandles[$key]
    if ($null -eq $stream -and -not [System.IO.File]::Exists($Path)) {
        try {
            $stream = Open-LockStream -Path $Path -Mode ([System.IO.FileMode]::CreateNew)
        }
        catch {
            if (-not [System.IO.File]::Exists($Path)) {
                throw
            }
            # Another run created it first: judged below.
            $stream = $null
        }
        if ($null -ne $stream) {
            try {
                Write-LockRecord -Stream $stream -Record $record
                Set-LockFileSecurity -Path $Path
            }
            catch {
                $stream.Dispose()
                [System.IO.File]::Delete($Path)
                throw
            }
            $LockHandles[$key] = $stream
            return @{ Acquired = $true; Record = $record; Previous = $null; Holder = $null }
        }
    }
    $kept = $null -ne $stream
    $fileOwner = $null
    $foreign = $false
    if (-not $kept) {
        $fileOwner = (Read-LockSecurity -Path $Path).Owner
        $foreign = $LockTrustedSids -notcontains $fileOwner
        if ($foreign) {
            # Not a file this agent wrote (a standard user's, planted while the folder still let Users create files):
            # made Administrators' first (taking ownership needs no access to its content), so that it can be judged.
            Set-LockFileSecurity -Path $Path
        }
        try {
            $stream = Open-LockStream -Path $Path -Mode ([System.IO.FileMode]::Open)
        }
        catch {
            if (Test-LockBusyError -ErrorRecord $_) {
                # Held open: by a batch that is running now (its lock is alive), or being deleted by its release.
                $holder = Read-LockHolder -Path $Path -TtlSeconds $TtlSeconds
                if ($foreign) {
                    # A standard user's file held open (FileShare.None: not even its record can be read): name its owner.
                    if ($null -eq $holder) {
                        $holder = [ordered]@{ token = $null; owner = $null; acquired = $null; expires = $null; process = $null; held = $false }
                    }
                    $holder['file_owner'] = $fileOwner
                }
                if ($null -eq $holder) {
                    return $null
                }
                return @{ Acquired = $false; Record = $null; Previous = $null; Holder = $holder }
            }
            throw
        }
    }
    $taken = $false
    try {
        $found = Read-LockRecord -Bytes (Read-LockStream -Stream $stream) -Path $Path -TtlSeconds $TtlSeconds
        $current = $found.Record
        $ours = $current.token -ceq $Token -and -not $foreign
        # Nobody else has the file open: a `held` record's batch has ended. Only an older version's record is judged
        # by its time and process; a file owned by anyone but SYSTEM or Administrators is no record to trust.
        $alive = -not $kept -and -not $current.held -and -not $foreign -and $found.Expires -gt $now -and (Test-LockProcessAlive -Record $current)
        if (-not $ours -and $alive) {
            return @{ Acquired = $false; Record = $null; Previous = $null; Holder = $current }
        }
        if ($ours) {
            # A renewal keeps the time it was first taken.
            $record['acquired'] = $current.acquired
        }
        Write-LockRecord -Stream $stream -Record $record
        if ($foreign) {
            $current['file_owner'] = $fileOwner
        }
        $previous = if ($ours) { $null } else { $current }
        $LockHandles[$key] = $stream
        $taken = $true
        return @{ Acquired = $true; Record = $record; Previous = $previous; Holder = $null }
    }
    finally {
        if (-not $taken -and -not $kept) {
            $stream.Dispose()
        }
    }
}

# lock.release's work on the file: $null when it was busy (try again).
function Invoke-LockRelease {
    param([string]$Path, [string]$Token)
    $key = [System.IO.Path]::GetFullPath($Path)
    $held = $LockHandles[$key]
    if ($null -ne $held) {
        # This batch holds the file open: nobody else could have written it since this batch took it.
        $found = Read-LockRecord -Bytes (Read-LockStream -Stream $held) -Path $Path -TtlSeconds 0
        if ($found.Record.token -cne $Token) {
            return [ordered]@{ released = $false; holder = $found.Record }
        }
        # Deleted while the handle is open (it shares delete): gone when the handle closes, never free in between.
        [System.IO.File]::Delete($Path)
        $held.Dispose()
        $LockHandles.Remove($key)
        return [ordered]@{ released = $true; holder = $null }
    }
    if (-not [System.IO.File]::Exists($Path)) {
        return [ordered]@{ released = $false; holder = $null }
    }
    try {
        # Shares read and write (a batch that took the lock over may hold it) and delete: the file is deleted while
        # this handle reads it.
        # pitfall-ok: file-io-without-backup-semantics the lock file is the agent's own (protected SYSTEM/Administrators DACL)
        $stream = New-Object System.IO.FileStream($Path, [System.IO.FileMode]::Open, [System.IO.FileAccess]::Read, ([System.IO.FileShare]::ReadWrite -bor [System.IO.FileShare]::Delete))
    }
    catch {
        if (Test-LockBusyError -ErrorRecord $_) {
            return $null
        }
        throw
    }
    try {
        $found = Read-LockRecord -Bytes (Read-LockStream -Stream $stream) -Path $Path -TtlSeconds 0
        if ($found.Record.token -cne $Token) {
            # Taken over after this run's lock expired or its batch was judged ended: not this run's to delete.
            return [ordered]@{ released = $false; holder = $found.Record }
        }
        [System.IO.File]::Delete($Path)
    }
    finally {
        $stream.Dispose()
    }
    return [ordered]@{ released = $true; holder = $null }
}

$Operations = [ordered]@{
    'system.info' = {
        param($Args_)
        $os = Get-CimInstance -ClassName Win32_OperatingSystem -ErrorAction Stop
        $computer = Get-CimInstance -ClassName Win32_ComputerSystem -ErrorAction Stop
        $machineGuid = (Get-ItemProperty -LiteralPath 'HKLM:\SOFTWARE\Microsoft\Cryptography' -Name MachineGuid -ErrorAction Stop).MachineGuid
        $domain = $null
        $fqdn = [string]$computer.DNSHostName
        if ($computer.PartOfDomain) {
            $domain = [string]$computer.Domain
            $fqdn = $fqdn + '.' + $domain
        }
        # The RD Connection Broker role: Get-WindowsFeature where Server Manager exists (Server SKUs); elsewhere the
        # presence of its service, Tssdis ("Remote Desktop Connection Broker").
        $broker = $null
        if (Get-Command -Name Get-WindowsFeature -ErrorAction SilentlyContinue) {
            try {
                $feature = Get-WindowsFeature -Name 'RDS-Connection-Broker' -ErrorAction Stop
                if ($null -ne $feature) {
                    $broker = [bool]$feature.Installed
                }
            }
            catch {
                $broker = $null
            }
        }
        if ($null -eq $broker) {
            # Absent is an answer (no broker); any other failure to read the service is an error, never "no broker".
            try {
                $broker = $null -ne (Get-Service -Name 'Tssdis' -ErrorAction Stop)
            }
            catch {
                if ($_.FullyQualifiedErrorId -notlike 'NoServiceFoundForGivenName*') {
                    throw
                }
                $broker = $false
            }
        }
        return [ordered]@{
            hostname = [string]$computer.Name
            fqdn = $fqdn
            domain = $domain
            os_build = [int]$os.BuildNumber
            os_caption = [string]$os.Caption
            machine_guid = [string]$machineGuid
            connection_broker = $broker
            boot_time = ConvertTo-IsoUtc -Date $os.LastBootUpTime
            program_data = [string]$env:ProgramData
            runtime = Get-RuntimeRecord
            caller = Get-CallerRecord
        }
    }

    'registry.get' = {
        param($Args_)
        $location = Get-RegistryLocation -Path (Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty)
        $requested = Get-OpArgument -Table $Args_ -Name 'names'
        $base = Open-RegistryBaseKey -Location $location
        try {
            $key = if ($location.SubKey) { $base.OpenSubKey($location.SubKey, $false) } else { $base }
            $values = [ordered]@{}
            if ($null -eq $key) {
                return [ordered]@{ exists = $false; values = $values; subkeys = @() }
            }
            try {
                $present = @($key.GetValueNames())
                $names = @(if ($null -eq $requested) { $present } else { $requested })
                foreach ($name in $names) {
                    if ($present -contains [string]$name) {
                        $values[[string]$name] = Get-RegistryValueRecord -Key $key -Name ([string]$name)
                    }
                }
                return [ordered]@{ exists = $true; values = $values; subkeys = @($key.GetSubKeyNames()) }
            }
            finally {
                $key.Dispose()
            }
        }
        finally {
            $base.Dispose()
        }
    }

    'registry.set' = {
        param($Args_)
        $location = Get-RegistryLocation -Path (Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty)
        $name = Get-StringArgument -Table $Args_ -Name 'name' -Default ''
        $type = Get-StringArgument -Table $Args_ -Name 'type' -Required -NotEmpty
        # Converted before anything is opened, so bad input changes nothing.
        $converted = ConvertTo-RegistryData -Type $type -Value (Get-OpArgument -Table $Args_ -Name 'value' -Required)
        $base = Open-RegistryBaseKey -Location $location
        try {
            $key = if ($location.SubKey) { $base.CreateSubKey($location.SubKey, [Microsoft.Win32.RegistryKeyPermissionCheck]::ReadWriteSubTree) } else { $base }
            try {
                $previous = $null
                if (Test-RegistryValueName -Key $key -Name $name) {
                    $previous = Get-RegistryValueRecord -Key $key -Name $name
                }
                $key.SetValue($name, $converted.Data, $converted.Kind)
                return [ordered]@{ previous = $previous }
            }
            finally {
                $key.Dispose()
            }
        }
        finally {
            $base.Dispose()
        }
    }

    'registry.remove' = {
        param($Args_)
        $location = Get-RegistryLocation -Path (Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty)
        $name = Get-StringArgument -Table $Args_ -Name 'name' -Default ''
        $base = Open-RegistryBaseKey -Location $location
        try {
            $key = if ($location.SubKey) { $base.OpenSubKey($location.SubKey, $true) } else { $base }
            if ($null -eq $key) {
                return [ordered]@{ previous = $null }
            }
            try {
                $previous = $null
                if (Test-RegistryValueName -Key $key -Name $name) {
                    $previous = Get-RegistryValueRecord -Key $key -Name $name
                    $key.DeleteValue($name, $true)
                }
                return [ordered]@{ previous = $previous }
            }
            finally {
                $key.Dispose()
            }
        }
        finally {
            $base.Dispose()
        }
    }

    'listener.get' = {
        param($Args_)
        $setting = Get-ListenerSetting -TerminalName (Get-TerminalNameArgument -Table $Args_)
        return [ordered]@{
            terminal_name = [string]$setting.TerminalName
            ssl_certificate_sha1_hash = Get-ThumbprintOrNull -Value $setting.SSLCertificateSHA1Hash
            ssl_certificate_sha1_hash_type = [int]$setting.SSLCertificateSHA1HashType
            security_layer = [int]$setting.SecurityLayer
            user_authentication = [int]$setting.UserAuthenticationRequired
            min_encryption_level = [int]$setting.MinEncryptionLevel
        }
    }

    'listener.set_certificate' = {
        param($Args_)
        $thumbprint = Get-ThumbprintArgument -Table $Args_
        $terminalName = Get-TerminalNameArgument -Table $Args_
        # The listener only accepts a certificate in LocalMachine\My; WMI answers a bare "Invalid Parameter"
        # otherwise ([Listener]: learn.microsoft.com/troubleshoot/windows-server/remote/remote-desktop-listener-certificate-configurations).
        if (-not (Test-Path -LiteralPath ('Cert:\LocalMachine\My\' + $thumbprint))) {
            throw (New-AgentException 'InvalidArgument' "certificate $thumbprint is not in LocalMachine\My")
        }
        $previous = Get-ThumbprintOrNull -Value (Get-ListenerSetting -TerminalName $terminalName).SSLCertificateSHA1Hash
        $filter = "TerminalName='$terminalName'"
        # Microsoft documents the change as a WMI property write (wmic ... Set SSLCertificateSHA1Hash=...); this is
        # the same write through Set-WmiInstance on the instance's __PATH. Writing it with Set-CimInstance is
        # UNCONFIRMED by any Microsoft source, so CIM is only used to read.
        if (Get-Command -Name Set-WmiInstance -ErrorAction SilentlyContinue) {
            $instance = Get-WmiObject -Namespace $TerminalServicesNamespace -Class Win32_TSGeneralSetting -Filter $filter -ErrorAction Stop
            $null = Set-WmiInstance -Path $instance.__PATH -Arguments @{ SSLCertificateSHA1Hash = $thumbprint } -ErrorAction Stop
        }
        else {
            # PowerShell 7 has no *-WmiObject cmdlets; System.Management performs the same Put as Set-WmiInstance.
            Add-Type -AssemblyName System.Management
            $searcher = New-Object System.Management.ManagementObjectSearcher($TerminalServicesNamespace, "SELECT * FROM Win32_TSGeneralSetting WHERE $filter")
            foreach ($instance in $searcher.Get()) {
                $instance['SSLCertificateSHA1Hash'] = $thumbprint
                $null = $instance.Put()
            }
        }
        return [ordered]@{ previous = $previous }
    }

    'cert.list' = {
        param($Args_)
        $store = Get-StoreArgument -Table $Args_
        $storePath = Get-StorePath -Store $store
        if (-not (Test-Path -LiteralPath $storePath)) {
            return [ordered]@{ store = $store; exists = $false; certificates = @() }
        }
        $certificates = New-Object System.Collections.Generic.List[object]
        foreach ($certificate in @(Get-ChildItem -LiteralPath $storePath -ErrorAction Stop)) {
            if ($certificate -isnot [System.Security.Cryptography.X509Certificates.X509Certificate2]) {
                continue
            }
            $certificates.Add([ordered]@{
                    thumbprint = $certificate.Thumbprint.ToUpperInvariant()
                    der_b64 = [System.Convert]::ToBase64String($certificate.RawData)
                    has_private_key = [bool]$certificate.HasPrivateKey
                    key = Get-CertificateKeyRecord -Certificate $certificate
                })
        }
        return [ordered]@{ store = $store; exists = $true; certificates = $certificates.ToArray() }
    }

    'cert.remove' = {
        param($Args_)
        $store = Get-StoreArgument -Table $Args_
        $thumbprint = Get-ThumbprintArgument -Table $Args_
        if (-not (Test-Path -LiteralPath (Get-StorePath -Store $store))) {
            return [ordered]@{ removed = $false }
        }
        $x509Store = Open-X509Store -Store $store -Flags ([System.Security.Cryptography.X509Certificates.OpenFlags]::ReadWrite -bor [System.Security.Cryptography.X509Certificates.OpenFlags]::OpenExistingOnly)
        try {
            $certificate = Find-StoreCertificate -X509Store $x509Store -Thumbprint $thumbprint
            if ($null -eq $certificate) {
                return [ordered]@{ removed = $false }
            }
            # Removes the certificate only; its private key file stays where it is.
            $x509Store.Remove($certificate)
            return [ordered]@{ removed = $true }
        }
        finally {
            $x509Store.Close()
        }
    }

    'cert.import' = {
        param($Args_)
        $store = Get-StoreArgument -Table $Args_
        $der = ConvertFrom-Base64Argument -Table $Args_ -Name 'der_b64'
        try {
            $certificate = New-Object System.Security.Cryptography.X509Certificates.X509Certificate2(, $der)
        }
        catch {
            throw (New-AgentException 'InvalidArgument' 'der_b64 is not a DER certificate')
        }
        # Opened read-write without OpenExistingOnly: a missing store is created, as certutil -addstore does.
        $x509Store = Open-X509Store -Store $store -Flags ([System.Security.Cryptography.X509Certificates.OpenFlags]::ReadWrite)
        try {
            $x509Store.Add($certificate)
        }
        finally {
            $x509Store.Close()
        }
        return [ordered]@{ thumbprint = $certificate.Thumbprint.ToUpperInvariant() }
    }

    'cert.repair_key_link' = {
        param($Args_)
        $store = Get-StoreArgument -Table $Args_
        $thumbprint = Get-ThumbprintArgument -Table $Args_
        $certificatePath = (Get-StorePath -Store $store) + '\' + $thumbprint
        if (-not (Test-Path -LiteralPath $certificatePath)) {
            throw (New-AgentException 'NotFound' "certificate $thumbprint is not in LocalMachine\$store")
        }
        # certutil works on the local machine's stores unless -user is given; -repairstore re-links a certificate
        # to a private key whose container is present (learn.microsoft.com/windows-server/administration/windows-commands/certutil#-repairstore).
        $certutil = [System.IO.Path]::Combine($env:SystemRoot, 'System32\certutil.exe')
        $run = Invoke-NativeProgram -FilePath $certutil -ArgumentList @('-repairstore', $store, $thumbprint)
        if ($run.ExitCode -ne 0) {
            $detail = ($run.StdOut + ' ' + $run.StdErr).Trim() -replace '\s+', ' '
            throw (New-AgentException 'Failed' ("certutil -repairstore exited with {0}: {1}" -f $run.ExitCode, $detail))
        }
        $certificate = Get-Item -LiteralPath $certificatePath -ErrorAction Stop
        return [ordered]@{ has_private_key = [bool]$certificate.HasPrivateKey }
    }

    'service.get' = {
        param($Args_)
        $names = @(Get-OpArgument -Table $Args_ -Name 'names' -Required)
        $services = [ordered]@{}
        foreach ($rawName in $names) {
            $name = Get-ServiceNameArgument -Name ([string]$rawName)
            $service = Get-Win32Service -Name $name
            if ($null -eq $service) {
                $services[$name] = [ordered]@{ exists = $false; status = $null; start_type = $null }
            }
            else {
                # Win32_Service.State says 'Stop Pending' where ServiceController says StopPending.
                $status = ([string]$service.State) -replace ' ', ''
                $services[$name] = [ordered]@{ exists = $true; status = $status; start_type = Get-ServiceStartType -Service $service }
            }
        }
        return [ordered]@{ services = $services }
    }

    'service.restart' = {
        param($Args_)
        $name = Get-ServiceNameArgument -Name (Get-StringArgument -Table $Args_ -Name 'name' -Required)
        $force = [bool](Get-OpArgument -Table $Args_ -Name 'force' -Default $false)
        $controller = Get-Service -Name $name -ErrorAction Stop
        $dependents = @($controller.DependentServices | Where-Object { [string]$_.Status -ne 'Stopped' })
        if ($dependents.Count -gt 0 -and -not $force) {
            throw (New-AgentException 'Failed' "Cannot stop service '$name' because it has dependent services. It can only be stopped if the Force flag is set.")
        }
        # Refuse before anything is stopped: a disabled service (or dependent) would stop and never start again.
        foreach ($item in @($controller) + $dependents) {
            $service = Get-Win32Service -Name ([string]$item.ServiceName)
            if ($null -ne $service -and (Get-ServiceStartType -Service $service) -eq 'Disabled') {
                throw (New-AgentException 'Failed' "service '$($item.ServiceName)' is disabled: a restart would stop it and it could not start again; nothing was stopped")
            }
        }
        # Dependents first (a running one keeps the service from stopping), then back up after it; every wait bounded.
        foreach ($dependent in $dependents) { Stop-ServiceBounded -Controller $dependent }
        Stop-ServiceBounded -Controller $controller
        Start-ServiceBounded -Controller $controller
        foreach ($dependent in $dependents) { Start-ServiceBounded -Controller $dependent }
        return [ordered]@{ status = Get-ServiceStatusText -Name $name }
    }

    'service.start' = {
        param($Args_)
        $name = Get-ServiceNameArgument -Name (Get-StringArgument -Table $Args_ -Name 'name' -Required)
        Start-ServiceBounded -Controller (Get-Service -Name $name -ErrorAction Stop)
        return [ordered]@{ status = Get-ServiceStatusText -Name $name }
    }

    'session.list' = {
        param($Args_)
        # WTSEnumerateSessions rather than parsing qwinsta: its output is localized.
        Initialize-NativeMethods
        $sessions = New-Object System.Collections.Generic.List[object]
        foreach ($session in [Rdpfix.Agent.NativeMethods]::GetSessions()) {
            $user = $null
            if ($session.User) {
                $user = if ($session.Domain) { $session.Domain + '\' + $session.User } else { $session.User }
            }
            $state = if ($session.State -ge 0 -and $session.State -lt $SessionStates.Count) { $SessionStates[$session.State] } else { [string]$session.State }
            $sessions.Add([ordered]@{ id = $session.Id; user = $user; state = $state; station = $session.Station })
        }
        return [ordered]@{ sessions = $sessions.ToArray() }
    }

    'file.stat' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            return [ordered]@{ exists = $false; is_dir = $false; size = $null; sha256 = $null; owner = $null; sddl = $null }
        }
        $isDir = [bool]$item.PSIsContainer
        $size = $null
        $sha256 = $null
        if (-not $isDir) {
            $size = [long]$item.Length
            try {
                $sha256 = Get-FileSha256Hex -Path $item.FullName
            }
            catch {
                # An unreadable file still has a size, owner and ACL worth reporting.
                if ((Get-AgentErrorType -ErrorRecord $_) -ne 'AccessDenied') {
                    throw
                }
            }
        }
        $security = Get-SecurityRecord -Path $item.FullName
        return [ordered]@{ exists = $true; is_dir = $isDir; size = $size; sha256 = $sha256; owner = $security.owner; sddl = $security.sddl }
    }

    'file.read' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            return [ordered]@{ exists = $false; content_b64 = $null }
        }
        if ($item.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$path' is a folder")
        }
        return [ordered]@{ exists = $true; content_b64 = [System.Convert]::ToBase64String((Read-FileBytes -Path $item.FullName)) }
    }

    'dir.list' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            return [ordered]@{ exists = $false; entries = @() }
        }
        if (-not $item.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$path' is not a folder")
        }
        $entries = New-Object System.Collections.Generic.List[object]
        foreach ($child in @(Get-ChildItem -LiteralPath $item.FullName -Force -ErrorAction Stop)) {
            $childIsDir = [bool]$child.PSIsContainer
            $childSize = if ($childIsDir) { $null } else { [long]$child.Length }
            $entries.Add([ordered]@{ name = [string]$child.Name; is_dir = $childIsDir; size = $childSize })
        }
        return [ordered]@{ exists = $true; entries = $entries.ToArray() }
    }

    # Every direct subfolder of a folder, with the named files in each, in one operation: the restore module
    # lists the backup manifests (folders whose names it does not know yet) in one round trip.
    'dir.read_each' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $names = @(Get-OpArgument -Table $Args_ -Name 'names' -Required)
        if ($names.Count -lt 1 -or $names.Count -gt 8) {
            throw (New-AgentException 'InvalidArgument' 'names must list 1 to 8 file names')
        }
        foreach ($name in $names) {
            if (-not ($name -is [string]) -or $name.Length -eq 0 -or $name.IndexOfAny([char[]]'\/:') -ge 0 -or $name -eq '.' -or $name -eq '..') {
                throw (New-AgentException 'InvalidArgument' "names must be plain file names, got '$name'")
            }
        }
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            return [ordered]@{ exists = $false; folders = @() }
        }
        if (-not $item.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$path' is not a folder")
        }
        $folders = New-Object System.Collections.Generic.List[object]
        foreach ($child in @(Get-ChildItem -LiteralPath $item.FullName -Directory -Force -ErrorAction Stop | Sort-Object -Property Name)) {
            $files = [ordered]@{}
            $errors = [ordered]@{}
            foreach ($name in $names) {
                $filePath = Join-Path -Path $child.FullName -ChildPath $name
                try {
                    if (Test-Path -LiteralPath $filePath -PathType Leaf) {
                        $files[$name] = [System.Convert]::ToBase64String((Read-FileBytes -Path $filePath))
                    }
                    else {
                        $files[$name] = $null
                    }
                }
                catch {
                    # One unreadable file does not hide the others: it is reported with its error.
                    $errors[$name] = "$(Get-AgentErrorType -ErrorRecord $_): $($_.Exception.Message)"
                }
            }
            $folders.Add([ordered]@{ name = [string]$child.Name; files = $files; errors = $errors })
        }
        return [ordered]@{ exists = $true; folders = $folders.ToArray() }
    }

    'util.sleep' = {
        param($Args_)
        $requested = Get-OpArgument -Table $Args_ -Name 'milliseconds' -Required
        if ($requested -is [string] -or $requested -is [bool] -or $requested -is [System.Array]) {
            throw (New-AgentException 'InvalidArgument' 'milliseconds must be an integer')
        }
        $milliseconds = [int]$requested
        if ($milliseconds -lt 0 -or $milliseconds -gt $MaxSleepMilliseconds) {
            throw (New-AgentException 'InvalidArgument' "milliseconds must be between 0 and $MaxSleepMilliseconds")
        }
        Start-Sleep -Milliseconds $milliseconds
        return [ordered]@{ slept_ms = $milliseconds }
    }

    'dir.create' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $sddl = Get-StringArgument -Table $Args_ -Name 'sddl'
        $claim = Get-StringArgument -Table $Args_ -Name 'claim'
        $claimText = Get-StringArgument -Table $Args_ -Name 'claim_text'
        $mustClaim = Get-OpArgument -Table $Args_ -Name 'must_claim' -Default $true
        if (-not ($mustClaim -is [bool])) {
            throw (New-AgentException 'InvalidArgument' "argument 'must_claim' must be true or false")
        }
        if ($claim -and ($claim.IndexOfAny([char[]]'\/:') -ge 0 -or $claim -eq '.' -or $claim -eq '..')) {
            throw (New-AgentException 'InvalidArgument' "claim must be a plain file name, got '$claim'")
        }
        $security = $null
        if ($sddl) {
            # Parsed before the folder is created, so a bad SDDL creates nothing (ArgumentException: InvalidArgument).
            $security = ConvertTo-DirectorySecurity -Sddl $sddl
        }
        $item = Get-ItemOrNull -Path $path
        if ($null -ne $item) {
            if (-not $item.PSIsContainer) {
                throw (New-AgentException 'InvalidArgument' "'$path' exists and is a file")
            }
            # An existing folder keeps its ACL: changing it would need a backup the planner did not ask for.
            if (-not $claim) {
                return [ordered]@{ created = $false }
            }
            $claimed = Add-FolderClaim -Folder $item.FullName -Name $claim -Text $claimText -MustClaim $mustClaim
            return [ordered]@{ created = $false; claimed = $claimed }
        }
        # Directory.CreateDirectory takes the path literally (New-Item -Path would read [ and ] as wildcards).
        $created = [System.IO.Directory]::CreateDirectory($path)
        if ($null -ne $security) {
            try {
                # An owner other than the caller (SYSTEM, for a fresh MachineKeys folder) needs SeRestorePrivilege
                # enabled, else "The security identifier is not allowed to be the owner of this object".
                Initialize-AgentToken
                Invoke-SecurityWrite -Action { Set-DirectorySecurity -Directory $created -Security $security }
            }
            catch {
                # A folder meant to be locked down must not stay behind with the inherited (wider) ACL.
                [System.IO.Directory]::Delete($created.FullName, $false)
                throw
            }
        }
        if (-not $claim) {
            return [ordered]@{ created = $true }
        }
        $claimed = Add-FolderClaim -Folder $created.FullName -Name $claim -Text $claimText -MustClaim $mustClaim
        return [ordered]@{ created = $true; claimed = $claimed }
    }

    'file.write' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $bytes = ConvertFrom-Base64Argument -Table $Args_ -Name 'content_b64'
        $null = Write-FileAtomically -Path $path -Bytes $bytes
        return [ordered]@{ size = [long]$bytes.Length; sha256 = Get-Sha256Hex -Bytes $bytes }
    }

    'file.copy' = {
        param($Args_)
        $source = Get-StringArgument -Table $Args_ -Name 'src' -Required -NotEmpty
        $destination = Get-StringArgument -Table $Args_ -Name 'dest' -Required -NotEmpty
        $sourceItem = Get-ItemOrNull -Path $source
        if ($null -eq $sourceItem) {
            throw (New-AgentException 'NotFound' "'$source' does not exist")
        }
        if ($sourceItem.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$source' is a folder")
        }
        $written = Write-FileAtomically -Path $destination -SourcePath $sourceItem.FullName
        return [ordered]@{ size = [long](Get-Item -LiteralPath $written -Force).Length; sha256 = Get-FileSha256Hex -Path $written }
    }

    # ---- rdpfix.rdp.machinekeys: folder ACLs in one call, ACL writes, same-volume moves ----

    'dir.stat' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            return [ordered]@{ exists = $false; owner = $null; sddl = $null; entries = @() }
        }
        if (-not $item.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$path' is not a folder")
        }
        $folderSecurity = Get-SecurityRecord -Path $item.FullName
        $entries = New-Object System.Collections.Generic.List[object]
        foreach ($child in @(Get-ChildItem -LiteralPath $item.FullName -Force -ErrorAction Stop)) {
            $childIsDir = [bool]$child.PSIsContainer
            $childSize = if ($childIsDir) { $null } else { [long]$child.Length }
            # A key file whose ACL locks out Administrators reports owner and sddl as null, not an error.
            $childSecurity = Get-SecurityRecord -Path $child.FullName
            $entries.Add([ordered]@{ name = $child.Name; is_dir = $childIsDir; size = $childSize; owner = $childSecurity.owner; sddl = $childSecurity.sddl })
        }
        return [ordered]@{ exists = $true; owner = $folderSecurity.owner; sddl = $folderSecurity.sddl; entries = $entries.ToArray() }
    }

    # ---- rdpfix.rdp.facts: several logs and channels since a time, each event with its level number and its data ----

    'events.query' = {
        param($Args_)
        # One XPath per query, exactly as the controller asked (it keeps every query within the event log's limit on
        # expressions); read with EventLogReader, not Get-WinEvent: Get-WinEvent's hashtable path tolerates a query
        # the event log refuses and answers "No events were found", and its -ErrorAction Stop loses a whole log to one
        # record it cannot read. Here a refused query is reported as refused, and an unreadable record is skipped and
        # counted. Nothing depends on the UI language: the level is System/Level, the data the <Data> elements.
        $sinceText = Get-StringArgument -Table $Args_ -Name 'since' -Required -NotEmpty
        $since = [datetime]::MinValue
        $styles = [System.Globalization.DateTimeStyles]::AdjustToUniversal -bor [System.Globalization.DateTimeStyles]::AssumeUniversal
        if (-not [datetime]::TryParse($sinceText, [System.Globalization.CultureInfo]::InvariantCulture, $styles, [ref]$since)) {
            throw (New-AgentException 'InvalidArgument' "since must be an ISO 8601 time, not '$sinceText'")
        }
        $maxEvents = Get-OpArgument -Table $Args_ -Name 'max_events' -Default 100
        if ($maxEvents -is [string] -or [int]$maxEvents -lt 1 -or [int]$maxEvents -gt 1000) {
            throw (New-AgentException 'InvalidArgument' 'max_events must be an integer from 1 to 1000')
        }
        # Reading a query stops after this many records that could not be read (a reader that does not advance).
        $maxUnreadable = 100
        $sinceXPath = $since.ToString("yyyy-MM-dd'T'HH:mm:ss.fff'Z'", [System.Globalization.CultureInfo]::InvariantCulture)
        $queries = @(Get-OpArgument -Table $Args_ -Name 'queries' -Required)

        # Every query is checked before any is run: a malformed one is the controller's mistake.
        $plans = New-Object System.Collections.Generic.List[object]
        foreach ($query in $queries) {
            $log = [string]$query.log
            if (-not $log) {
                throw (New-AgentException 'InvalidArgument' 'every query needs a log')
            }
            $conditions = New-Object System.Collections.Generic.List[string]
            if ($null -ne $query.providers) {
                $names = New-Object System.Collections.Generic.List[string]
                foreach ($provider in @($query.providers)) {
                    $providerName = [string]$provider
                    if (-not $providerName -or $providerName.Contains("'")) {
                        throw (New-AgentException 'InvalidArgument' "provider name '$providerName' cannot be queried")
                    }
                    $names.Add("Provider[@Name='$providerName']")
                }
                $conditions.Add('(' + ($names.ToArray() -join ' or ') + ')')
            }
            if ($null -ne $query.ids) {
                $idTerms = New-Object System.Collections.Generic.List[string]
                foreach ($id in @($query.ids)) {
                    if ($id -is [System.Array]) {
                        if ($id.Count -ne 2) {
                            throw (New-AgentException 'InvalidArgument' 'an ID range is [low, high]')
                        }
                        $idTerms.Add('(EventID>=' + [int]$id[0] + ' and EventID<=' + [int]$id[1] + ')')
                    }
                    else {
                        $idTerms.Add('EventID=' + [int]$id)
                    }
                }
                $conditions.Add('(' + ($idTerms.ToArray() -join ' or ') + ')')
            }
            $conditions.Add("TimeCreated[@SystemTime>='$sinceXPath']")
            $plans.Add([ordered]@{ log = $log; xpath = '*[System[' + ($conditions.ToArray() -join ' and ') + ']]' })
        }

        $records = New-Object System.Collections.Generic.List[object]
        $unavailable = New-Object System.Collections.Generic.List[object]
        $invalid = New-Object System.Collections.Generic.List[object]
        $unreadable = New-Object System.Collections.Generic.List[object]
        for ($index = 0; $index -lt $plans.Count; $index++) {
            $log = $plans[$index].log
            $eventQuery = New-Object System.Diagnostics.Eventing.Reader.EventLogQuery($log, [System.Diagnostics.Eventing.Reader.PathType]::LogName, $plans[$index].xpath)
            # Newest first; TolerateQueryErrors stays false, so a refused query throws instead of reading nothing.
            $eventQuery.ReverseDirection = $true
            $reader = $null
            try {
                $reader = New-Object System.Diagnostics.Eventing.Reader.EventLogReader($eventQuery)
            }
            catch {
                $exception = $_.Exception
                while ($exception -is [System.Management.Automation.MethodInvocationException] -and $null -ne $exception.InnerException) {
                    $exception = $exception.InnerException
                }
                if ($exception -is [System.Diagnostics.Eventing.Reader.EventLogNotFoundException] -or $exception -is [System.UnauthorizedAccessException]) {
                    # A channel this build does not have, or that this account may not read (Security).
                    $unavailable.Add([ordered]@{ log = $log; reason = [string]$exception.Message })
                }
                elseif ($exception -is [System.Diagnostics.Eventing.Reader.EventLogException]) {
                    # ERROR_EVT_INVALID_QUERY and the like: the events are unknown, not absent.
                    $invalid.Add([ordered]@{ index = $index; log = $log; reason = [string]$exception.Message })
                }
                else {
                    throw
                }
                continue
            }
            try {
                $returned = 0
                $skipped = 0
                $reason = $null
                while ($returned -lt [int]$maxEvents -and $skipped -lt $maxUnreadable) {
                    $entry = $null
                    $record = $null
                    try {
                        $entry = $reader.ReadEvent()
                        if ($null -eq $entry) {
                            break
                        }
                        # ToXml renders the event's own values: System/Level as a number, every <Data> element.
                        $xml = [xml]$entry.ToXml()
                        $data = [ordered]@{}
                        $position = 0
                        foreach ($item in @($xml.Event.EventData.Data)) {
                            if ($null -eq $item) { continue }
                            if ($item -is [string]) {
                                # A classic event's unnamed <Data>: its position is its name.
                                $data["param$position"] = $item
                            }
                            else {
                                $dataName = [string]$item.GetAttribute('Name')
                                if (-not $dataName) { $dataName = "param$position" }
                                $data[$dataName] = [string]$item.InnerText
                            }
                            $position++
                        }
                        $levelNumber = 0
                        if ($null -ne $entry.Level) { $levelNumber = [int]$entry.Level }
                        $record = [ordered]@{
                            log = [string]$entry.LogName
                            provider = [string]$entry.ProviderName
                            id = [int]$entry.Id
                            level = $levelNumber
                            level_name = $null
                            time = ConvertTo-IsoUtc -Date $entry.TimeCreated
                            message = $null
                            data = $data
                        }
                    }
                    catch {
                        $skipped++
                        if ($null -eq $reason) { $reason = [string]$_.Exception.Message }
                        if ($null -ne $entry) { $entry.Dispose() }
                        continue
                    }
                    # Rendered in the host's UI language, from the provider's resources that may be missing: shown to
                    # the user, never judged, and a record without them is kept.
                    try { $record.level_name = [string]$entry.LevelDisplayName } catch { $record.level_name = $null }
                    try { $record.message = $entry.FormatDescription() } catch { $record.message = $null }
                    $entry.Dispose()
                    $records.Add($record)
                    $returned++
                }
                if ($skipped -gt 0) {
                    $unreadable.Add([ordered]@{ log = $log; count = $skipped; reason = $reason })
                }
            }
            finally {
                $reader.Dispose()
            }
        }
        $newest = @($records.ToArray() | Sort-Object -Property { $_.time } -Descending)
        return [ordered]@{ events = $newest; unavailable = $unavailable.ToArray(); invalid_queries = $invalid.ToArray(); unreadable = $unreadable.ToArray() }
    }

    'acl.set' = {
        param($Args_)
        $path = Get-StringArgument -Table $Args_ -Name 'path' -Required -NotEmpty
        $sddl = Get-StringArgument -Table $Args_ -Name 'sddl' -Required -NotEmpty
        # Parsed first, so a bad SDDL changes nothing (ArgumentException: InvalidArgument).
        $descriptor = New-Object System.Security.AccessControl.RawSecurityDescriptor($sddl)
        $item = Get-ItemOrNull -Path $path
        if ($null -eq $item) {
            throw (New-AgentException 'NotFound' "'$path' does not exist")
        }
        # An administrator may set any owner and DACL with SeRestorePrivilege and SeTakeOwnershipPrivilege, even on a
        # key file whose ACL does not name Administrators; both are held but disabled by default in an elevated token.
        # The agent enables SeBackup/SeRestore once per run (Initialize-AgentToken); SeTakeOwnership only here.
        Initialize-AgentToken
        $null = [Rdpfix.Agent.Token]::Enable('SeTakeOwnershipPrivilege')
        $previous = (Get-SecurityRecord -Path $item.FullName).sddl
        if ($item.PSIsContainer) {
            Invoke-SecurityWrite -Action { Set-DirectorySecurity -Directory $item -Security (ConvertTo-DirectorySecurity -Sddl $sddl) }
        }
        else {
            $sections = [System.Security.AccessControl.AccessControlSections]::Access
            if ($null -ne $descriptor.Owner) { $sections = $sections -bor [System.Security.AccessControl.AccessControlSections]::Owner }
            if ($null -ne $descriptor.Group) { $sections = $sections -bor [System.Security.AccessControl.AccessControlSections]::Group }
            $security = New-Object System.Security.AccessControl.FileSecurity
            $security.SetSecurityDescriptorSddlForm($sddl, $sections)
            # FileInfo.SetAccessControl on .NET Framework; FileSystemAclExtensions on .NET (PowerShell 7).
            Invoke-SecurityWrite -Action {
                if ($null -ne $item.PSObject.Methods['SetAccessControl']) {
                    $item.SetAccessControl($security)
                }
                else {
                    # pitfall-ok: newer-than-net452 reached only where FileInfo has no SetAccessControl (.NET, PowerShell 7)
                    [System.IO.FileSystemAclExtensions]::SetAccessControl([System.IO.FileInfo]$item, $security)
                }
            }
        }
        return [ordered]@{ previous = $previous }
    }

    'file.move' = {
        param($Args_)
        $source = Get-StringArgument -Table $Args_ -Name 'src' -Required -NotEmpty
        $destination = Get-StringArgument -Table $Args_ -Name 'dest' -Required -NotEmpty
        $sourceItem = Get-ItemOrNull -Path $source
        if ($null -eq $sourceItem) {
            throw (New-AgentException 'NotFound' "'$source' does not exist")
        }
        if ($sourceItem.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$source' is a folder")
        }
        if ($null -ne (Get-ItemOrNull -Path $destination)) {
            throw (New-AgentException 'InvalidArgument' "'$destination' already exists")
        }
        # Hashed BEFORE the move (with backup semantics): a hash that fails after the rename would report the op
        # failed, stop the batch and leave a certificate without its key. A rename never changes the bytes.
        $size = [long]$sourceItem.Length
        $sha256 = Get-FileSha256Hex -Path $sourceItem.FullName
        # Same volume: a rename, so bytes, owner and explicit ACL travel with the file.
        [System.IO.File]::Move($sourceItem.FullName, $destination)
        return [ordered]@{ size = $size; sha256 = $sha256 }
    }

    'dir.move' = {
        param($Args_)
        $source = Get-StringArgument -Table $Args_ -Name 'src' -Required -NotEmpty
        $destination = Get-StringArgument -Table $Args_ -Name 'dest' -Required -NotEmpty
        $sourceItem = Get-ItemOrNull -Path $source
        if ($null -eq $sourceItem) {
            throw (New-AgentException 'NotFound' "'$source' does not exist")
        }
        if (-not $sourceItem.PSIsContainer) {
            throw (New-AgentException 'InvalidArgument' "'$source' is not a folder")
        }
        if ($null -ne (Get-ItemOrNull -Path $destination)) {
            throw (New-AgentException 'InvalidArgument' "'$destination' already exists")
        }
        # Directory.Move renames within one volume and refuses to cross volumes, so nothing is ever half copied.
        [System.IO.Directory]::Move($sourceItem.FullName, $destination)
        return [ordered]@{ moved = $true }
    }

    'firewall.rules.list' = {
        param($Args_)
        return [ordered]@{
            rules = @(Get-FirewallRuleRecords)
            profiles = @(Get-NetFirewallProfile -PolicyStore ActiveStore -ErrorAction Stop | ForEach-Object {
                    [ordered]@{
                        name = [string]$_.Name
                        enabled = ([string]$_.Enabled -eq 'True')
                        default_inbound_action = [string]$_.DefaultInboundAction
                        default_outbound_action = [string]$_.DefaultOutboundAction
                    }
                })
            network_categories = @(Get-NetworkCategories)
        }
    }

    # Only the local store is written (the cmdlets' default, PersistentStore): a rule Group Policy delivers is
    # reported, never changed, and a Name only Group Policy has is NotFound here, as Set-NetFirewallRule says.
    'firewall.rule.set' = {
        param($Args_)
        $name = Get-StringArgument -Table $Args_ -Name 'name' -Required
        $previous = @(Get-FirewallRuleRecords -Name $name -Stores @('PersistentStore'))
        if ($previous.Count -eq 0) {
            $policy = @(Get-FirewallRuleRecords -Name $name -Stores @('RSOP'))
            $where = if ($policy.Count -gt 0) { ' (Group Policy has a rule with this Name, which is not changed here)' } else { '' }
            throw (New-AgentException 'NotFound' "no firewall rule of the local store has the Name '$name'$where")
        }
        $parameters = @{ Name = $name; PolicyStore = 'PersistentStore'; ErrorAction = 'Stop' }
        $enabled = Get-OpArgument -Table $Args_ -Name 'enabled'
        if ($null -ne $enabled) { $parameters.Enabled = if ([bool]$enabled) { 'True' } else { 'False' } }
        $profiles = Get-OpArgument -Table $Args_ -Name 'profiles'
        if ($null -ne $profiles) { $parameters.Profile = [int]$profiles }
        $localPorts = Get-OpArgument -Table $Args_ -Name 'local_ports'
        if ($null -ne $localPorts) { $parameters.LocalPort = @($localPorts | ForEach-Object { [string]$_ }) }
        $remoteAddresses = Get-OpArgument -Table $Args_ -Name 'remote_addresses'
        if ($null -ne $remoteAddresses) { $parameters.RemoteAddress = @($remoteAddresses | ForEach-Object { [string]$_ }) }
        $program = Get-StringArgument -Table $Args_ -Name 'program'
        if ($program) { $parameters.Program = $program }
        Set-NetFirewallRule @parameters
        return [ordered]@{ previous = $previous[0] }
    }

    'firewall.rule.new' = {
        param($Args_)
        $name = Get-StringArgument -Table $Args_ -Name 'name' -Required
        # Both stores: a local rule with the Name of a Group Policy rule would be shadowed by it.
        foreach ($store in $FirewallRuleStores) {
            if (@(Get-FirewallStoreRules -Store $store -Name $name).Count -gt 0) {
                throw (New-AgentException 'InvalidArgument' "a firewall rule with the Name '$name' exists ($store)")
            }
        }
        $parameters = @{
            Name = $name
            PolicyStore = 'PersistentStore'
            DisplayName = Get-StringArgument -Table $Args_ -Name 'display_name' -Required
            Group = Get-StringArgument -Table $Args_ -Name 'group' -Required
            Direction = Get-StringArgument -Table $Args_ -Name 'direction' -Required
            Action = Get-StringArgument -Table $Args_ -Name 'action' -Required
            Enabled = if ([bool](Get-OpArgument -Table $Args_ -Name 'enabled' -Required)) { 'True' } else { 'False' }
            Profile = [int](Get-OpArgument -Table $Args_ -Name 'profiles' -Required)
            Protocol = Get-StringArgument -Table $Args_ -Name 'protocol' -Required
            RemoteAddress = @(Get-OpArgument -Table $Args_ -Name 'remote_addresses' -Required | ForEach-Object { [string]$_ })
            Program = Get-StringArgument -Table $Args_ -Name 'program' -Required
            Description = Get-StringArgument -Table $Args_ -Name 'description' -Default ''
            ErrorAction = 'Stop'
        }
        $localPorts = Get-OpArgument -Table $Args_ -Name 'local_ports'
        if ($null -ne $localPorts) { $parameters.LocalPort = @($localPorts | ForEach-Object { [string]$_ }) }
        $service = Get-StringArgument -Table $Args_ -Name 'service'
        if ($service) { $parameters.Service = $service }
        $null = New-NetFirewallRule @parameters
        return [ordered]@{ name = $name }
    }

    'firewall.rule.remove' = {
        param($Args_)
        $name = Get-StringArgument -Table $Args_ -Name 'name' -Required
        $previous = @(Get-FirewallRuleRecords -Name $name -Stores @('PersistentStore'))
        if ($previous.Count -eq 0) {
            return [ordered]@{ previous = $null }
        }
        Remove-NetFirewallRule -Name $name -PolicyStore PersistentStore -ErrorAction Stop
        return [ordered]@{ previous = $previous[0] }
    }

    'security_products.list' = {
        param($Args_)
        # root\SecurityCenter2 exists on client SKUs only; its absence is an answer, not an error.
        # Asking root for its child namespace answers nothing when there is none; a failure to ask is an error.
        $namespace = Get-CimInstance -Namespace 'root' -ClassName '__NAMESPACE' -Filter "Name='SecurityCenter2'" -ErrorAction Stop
        if ($null -eq $namespace) {
            return [ordered]@{ available = $false; firewall = @(); antivirus = @() }
        }
        $read = {
            param([string]$ClassName)
            @(Get-CimInstance -Namespace 'root\SecurityCenter2' -ClassName $ClassName -ErrorAction Stop | ForEach-Object {
                    [ordered]@{ name = [string]$_.displayName; state = [long]$_.productState; path = [string]$_.pathToSignedProductExe }
                })
        }
        return [ordered]@{ available = $true; firewall = @(& $read 'FirewallProduct'); antivirus = @(& $read 'AntiVirusProduct') }
    }

    'tls.cipher_suites.list' = {
        param($Args_)
        if ($null -eq (Get-Command -Name 'Get-TlsCipherSuite' -ErrorAction SilentlyContinue)) {
            return [ordered]@{ available = $false; suites = @() }
        }
        $suites = @(Get-TlsCipherSuite | ForEach-Object {
                [ordered]@{
                    name = [string]$_.Name
                    certificate = [string]$_.Certificate
                    exchange = [string]$_.Exchange
                    cipher = [string]$_.Cipher
                    hash = [string]$_.Hash
                    protocols = @($_.Protocols | ForEach-Object { [int]$_ })
                }
            })
        return [ordered]@{ available = $true; suites = $suites }
    }

    'guard' = {
        param($Args_)
        $label = Get-StringArgument -Table $Args_ -Name 'label' -Required -NotEmpty
        $read = Get-OpArgument -Table $Args_ -Name 'read' -Required
        if ((Get-GuardKind -Value $read) -ne 'object') {
            throw (New-AgentException 'InvalidArgument' "argument 'read' must be an object {op, args}")
        }
        $readTable = ConvertTo-ArgumentTable -Arguments $read
        $op = $readTable['op']
        if (-not ($op -is [string]) -or -not ($GuardReadOperations -ccontains $op)) {
            throw (New-AgentException 'InvalidArgument' "a guard reads with a read operation, not '$op'")
        }
        $readArguments = $readTable['args']
        if ($null -ne $readArguments -and (Get-GuardKind -Value $readArguments) -ne 'object') {
            throw (New-AgentException 'InvalidArgument' "argument 'read.args' must be an object")
        }
        if (-not $Args_.ContainsKey('expect')) {
            throw (New-AgentException 'InvalidArgument' "missing argument 'expect'")
        }
        $expected = $Args_['expect']
        $match = Get-StringArgument -Table $Args_ -Name 'match' -Default 'equal'
        if ($match -cne 'equal' -and $match -cne 'subset') {
            throw (New-AgentException 'InvalidArgument' "argument 'match' must be equal or subset, got '$match'")
        }
        $steps = Get-GuardSteps -Table $Args_
        try {
            $data = Invoke-AgentOperation -Name $op -Arguments $readArguments
        }
        catch {
            # The read's own error type: a guard that cannot read knows nothing, which is not a difference.
            throw (New-AgentException (Get-AgentErrorType -ErrorRecord $_) ($label + ': ' + $op + ' failed: ' + $_.Exception.Message))
        }
        # The data as it travels to the controller, as the expectation travelled to the agent.
        $travelled = ConvertFrom-Json -InputObject (ConvertTo-Json -InputObject $data -Depth $DataJsonDepth -Compress)
        $actual = (Select-GuardValue -Data $travelled -Steps $steps).Value
        $difference = Compare-GuardValue -Expected $expected -Actual $actual -Match $match -Path (Get-GuardPickName -Steps $steps)
        if ($null -ne $difference) {
            $AgentErrorData.Value = [ordered]@{ actual = $actual }
            throw (New-AgentException 'GuardFailed' ($label + ': ' + $difference))
        }
        return [ordered]@{ actual = $actual }
    }

    'lock.acquire' = {
        param($Args_)
        $path = Get-LockPath -Table $Args_
        $secure = Get-OpArgument -Table $Args_ -Name 'secure_folder' -Default $false
        if (-not ($secure -is [bool])) {
            throw (New-AgentException 'InvalidArgument' "argument 'secure_folder' must be true or false")
        }
        $token = Get-StringArgument -Table $Args_ -Name 'token' -Required -NotEmpty
        $owner = Get-OpArgument -Table $Args_ -Name 'owner' -Required
        if ((Get-GuardKind -Value $owner) -ne 'object') {
            throw (New-AgentException 'InvalidArgument' "argument 'owner' must be an object")
        }
        $ttl = Get-BoundedIntegerArgument -Table $Args_ -Name 'ttl_seconds' -Minimum 1 -Maximum $LockMaxTtlSeconds
        $wait = Get-BoundedIntegerArgument -Table $Args_ -Name 'wait_ms' -Minimum 0 -Maximum $LockMaxWaitMilliseconds -Default 0
        $poll = Get-BoundedIntegerArgument -Table $Args_ -Name 'poll_ms' -Minimum 100 -Maximum 10000 -Default 1000
        $process = Get-AgentProcessRecord
        $folder = Initialize-LockFolder -Folder ([System.IO.Path]::GetDirectoryName([System.IO.Path]::GetFullPath($path))) -Secure $secure
        $clock = [System.Diagnostics.Stopwatch]::StartNew()
        while ($true) {
            $attempt = $null
            try {
                $attempt = Invoke-LockAttempt -Path $path -Token $token -Owner $owner -TtlSeconds $ttl -Process $process
            }
            catch {
                # A lock file being deleted by its holder refuses access for a moment; past the wait, the error stands.
                if (-not (Test-LockBusyError -ErrorRecord $_) -or $clock.ElapsedMilliseconds -ge $wait) {
                    throw
                }
            }
            if ($null -ne $attempt -and $attempt.Acquired) {
                return [ordered]@{ acquired = $true; path = $path; lock = $attempt.Record; previous = $attempt.Previous; waited_ms = [int]$clock.ElapsedMilliseconds; folder = $folder }
            }
            $remaining = $wait - $clock.ElapsedMilliseconds
            if ($remaining -le 0) {
                $holder = if ($null -ne $attempt) { $attempt.Holder } else { $null }
                $AgentErrorData.Value = [ordered]@{ path = $path; holder = $holder; now = ConvertTo-IsoUtc -Date ([datetime]::UtcNow); waited_ms = [int]$clock.ElapsedMilliseconds; folder = $folder }
                $until = if ($null -ne $holder -and $null -ne $holder.expires) { $holder.expires } else { 'unknown' }
                throw (New-AgentException 'Locked' "the rdpfix run lock $path is held by another run until $until")
            }
            Start-Sleep -Milliseconds ([int][math]::Min($poll, $remaining))
        }
    }

    'lock.release' = {
        param($Args_)
        $path = Get-LockPath -Table $Args_
        $token = Get-StringArgument -Table $Args_ -Name 'token' -Required -NotEmpty
        # Another agent may hold the file open for a moment (reading the record, or an older version judging it with
        # FileShare.None): try again, a bounded number of times.
        for ($attempt = 1; $attempt -le $LockReleaseAttempts; $attempt++) {
            try {
                $released = Invoke-LockRelease -Path $path -Token $token
            }
            catch {
                if (-not (Test-LockBusyError -ErrorRecord $_) -or $attempt -ge $LockReleaseAttempts) {
                    throw
                }
                $released = $null
            }
            if ($null -ne $released) {
                return $released
            }
            if ($attempt -lt $LockReleaseAttempts) {
                Start-Sleep -Milliseconds $LockReleasePauseMilliseconds
            }
        }
        throw (New-AgentException 'Locked' "the rdpfix run lock $path stayed open in another process; it was not released")
    }
}

# --------------------------------------------------------------------------------------------------------------------
# The batch
# --------------------------------------------------------------------------------------------------------------------

function Invoke-AgentOperation {
    param([string]$Name, $Arguments)
    if (-not ($Operations.Keys -ccontains $Name)) {
        throw (New-AgentException 'Unsupported' "unknown operation '$Name'")
    }
    $argumentTable = ConvertTo-ArgumentTable -Arguments $Arguments
    # An operation returns one dictionary; anything a .NET call let slip into the output before it is dropped.
    $output = @(& $Operations[$Name] $argumentTable)
    if ($output.Count -eq 0) {
        return [ordered]@{}
    }
    return $output[$output.Count - 1]
}

function Invoke-Batch {
    param($Batch)
    $onError = if ($null -eq $Batch.on_error) { 'stop' } else { [string]$Batch.on_error }
    if ($onError -ne 'stop' -and $onError -ne 'continue') {
        throw "on_error must be 'stop' or 'continue', not '$onError'"
    }
    $operations = @(if ($null -ne $Batch.ops) { $Batch.ops })
    $results = New-Object System.Collections.Generic.List[object]
    $failed = $false
    # The locks this batch takes live as long as it runs: their files are closed when it ends, however it ends (a
    # terminate stops the pipeline and runs this finally; a killed process closes its handles).
    try {
        foreach ($operation in $operations) {
            $name = [string]$operation.op
            # An operation marked "always" (a lock's release) runs even after a failure stopped the batch.
            if ($failed -and $onError -eq 'stop' -and $operation.always -ne $true) {
                $results.Add([ordered]@{ op = $name; ok = $false; skipped = $true })
                continue
            }
            $AgentErrorData.Value = $null
            try {
                $data = Invoke-AgentOperation -Name $name -Arguments $operation.args
                if ($null -ne $operation.expect) {
                    # What the batch requires the operation to have done (cert.remove: removed = true): compared with its
                    # data as a guard compares (subset); an operation that did less stops the batch here.
                    $travelled = ConvertFrom-Json -InputObject (ConvertTo-Json -InputObject $data -Depth $DataJsonDepth -Compress)
                    $difference = Compare-GuardValue -Expected $operation.expect -Actual $travelled -Match 'subset' -Path ''
                    if ($null -ne $difference) {
                        $AgentErrorData.Value = $data
                        throw (New-AgentException 'NotDone' "it did not do what the batch required ($difference)")
                    }
                }
                $results.Add([ordered]@{ op = $name; ok = $true; data = $data })
            }
            catch {
                $failed = $true
                $failure = [ordered]@{
                    op = $name
                    ok = $false
                    error = [ordered]@{ type = Get-AgentErrorType -ErrorRecord $_; message = [string]$_.Exception.Message }
                }
                if ($null -ne $AgentErrorData.Value) {
                    $failure['data'] = $AgentErrorData.Value
                }
                $results.Add($failure)
            }
        }
    }
    finally {
        Close-LockHandles
    }
    return [ordered]@{ v = $ProtocolVersion; results = $results.ToArray() }
}

function Write-AgentOutput {
    param([string]$Text)
    try {
        # UTF-8 without a BOM; fails harmlessly where there is no console.
        [Console]::OutputEncoding = New-Object System.Text.UTF8Encoding($false)
    }
    catch {
        $null = $_
    }
    [Console]::Out.Write($Text + "`n")
    [Console]::Out.Flush()
}

try {
    if (-not $BatchJson) {
        # Ansible's module wrapper: the module arguments are the global $complex_args (a hashtable).
        if (Test-Path -LiteralPath 'Variable:\complex_args') {
            $moduleArguments = Get-Variable -Name complex_args -Scope Global -ValueOnly
            $BatchJson = [string]$moduleArguments['batch']
        }
    }
    if (-not $BatchJson) {
        throw 'no batch: expected the module argument "batch" or the -BatchJson parameter'
    }
    $batch = ConvertFrom-Json -InputObject $BatchJson
    if ($null -eq $batch -or $batch.v -ne $ProtocolVersion) {
        throw "unsupported batch: protocol version $ProtocolVersion expected"
    }
    $document = Invoke-Batch -Batch $batch
    Write-AgentOutput -Text (ConvertTo-Json -InputObject $document -Depth $ResultJsonDepth -Compress)
}
catch {
    # No result document: a failed module result, which the controller reports as an agent failure with this text.
    $failure = [ordered]@{ failed = $true; msg = 'rdpfix agent: ' + $_.Exception.Message }
    Write-AgentOutput -Text (ConvertTo-Json -InputObject $failure -Compress)
    exit 1
}
