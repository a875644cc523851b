# Copyright: contributors to rdpfix.rdp
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
#
# Runs a program as NT AUTHORITY\SYSTEM through a one-off scheduled task (Azure Run Command and become_user: SYSTEM
# give the agent this account), waits for it, prints its output and exits with its exit code. Needs an elevated
# Administrator, as GitHub's Windows runners are; no PsExec or other download.
#
#   powershell -File tests\windows\run-as-system.ps1 -Program C:\...\python.exe -Arguments 'tests\windows\rdpfix_local.py selftest'

param(
    [Parameter(Mandatory = $true)][string]$Program,
    [Parameter(Mandatory = $true)][string]$Arguments,
    [string]$WorkingDirectory = (Get-Location).Path,
    [int]$TimeoutSeconds = 900
)

$ErrorActionPreference = 'Stop'

# SCHED_S_TASK_RUNNING (0x41301) and SCHED_S_TASK_HAS_NOT_RUN (0x41303): the task has not finished yet.
$NotFinished = @(267009, 267011)

$name = 'rdpfix-ci-' + [guid]::NewGuid().ToString('N').Substring(0, 12)
$log = Join-Path -Path $env:TEMP -ChildPath ($name + '.log')
# cmd.exe redirects both streams into a file the calling account can read afterwards.
$command = '/d /c ""' + $Program + '" ' + $Arguments + ' > "' + $log + '" 2>&1"'
$action = New-ScheduledTaskAction -Execute 'cmd.exe' -Argument $command -WorkingDirectory $WorkingDirectory
$principal = New-ScheduledTaskPrincipal -UserId 'S-1-5-18' -LogonType ServiceAccount -RunLevel Highest
$settings = New-ScheduledTaskSettingsSet -ExecutionTimeLimit (New-TimeSpan -Seconds $TimeoutSeconds)
$null = Register-ScheduledTask -TaskName $name -Action $action -Principal $principal -Settings $settings
try {
    Start-ScheduledTask -TaskName $name
    $deadline = (Get-Date).AddSeconds($TimeoutSeconds + 60)
    do {
        Start-Sleep -Seconds 2
        $info = Get-ScheduledTaskInfo -TaskName $name
        $state = [string](Get-ScheduledTask -TaskName $name).State
    } while (($state -eq 'Running' -or $state -eq 'Queued' -or $NotFinished -contains $info.LastTaskResult) -and (Get-Date) -lt $deadline)
    if (Test-Path -LiteralPath $log) {
        Get-Content -LiteralPath $log
    }
    if ($NotFinished -contains $info.LastTaskResult) {
        throw "the task running as SYSTEM did not finish within $TimeoutSeconds s"
    }
    exit [int]$info.LastTaskResult
}
finally {
    Unregister-ScheduledTask -TaskName $name -Confirm:$false
}
